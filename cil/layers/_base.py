"""What every injected module shares: a marker base class and block discovery on timm ViTs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import nn

__all__ = ["PEFTModule", "select_blocks", "unwrap", "vit_blocks"]


class PEFTModule(nn.Module):
    """Base of every injected module. ``base`` (if any) is the frozen module it wraps; all other parameters are
    the module's own, trainable ones."""

    kind: str = "peft"

    def own_parameters(self) -> Iterator[nn.Parameter]:
        base = getattr(self, "base", None)
        frozen = {id(p) for p in base.parameters()} if isinstance(base, nn.Module) else set()
        for parameter in self.parameters():
            if id(parameter) not in frozen:
                yield parameter


def vit_blocks(model: nn.Module) -> nn.Sequential:
    """The transformer blocks of a timm ``VisionTransformer`` (ViT, DeiT, DINOv2, ...)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(model, "patch_embed"):
        raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer (no patch_embed / blocks)")
    return blocks


def select_blocks(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """Indices of the blocks to inject into: all of them by default; negative indices count from the end."""
    depth = len(vit_blocks(model))
    if layers is None:
        return list(range(depth))
    chosen = []
    for layer in layers:
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise ValueError(f"layer {layer} does not exist: the model has {depth} blocks")
        chosen.append(index)
    return sorted(set(chosen))


def unwrap(module: nn.Module) -> nn.Module:
    """The original module under any PEFT wrappers."""
    while isinstance(module, PEFTModule) and isinstance(getattr(module, "base", None), nn.Module):
        module = module.base  # type: ignore[assignment]
    return module
