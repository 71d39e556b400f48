"""SSF (Lian et al., NeurIPS 2022): a learned per-channel scale and shift after chosen operations.

``y = op(x) * gamma + beta`` with ``gamma ~ N(1, init_std)`` and ``beta ~ N(0, init_std)``; the paper and APER use
``init_std = 0.02``, and ``init_std=0`` starts exactly at the pre-trained model.

Placement follows the SSF ViT that APER trains (LAMDA-PILOT ``backbone/vit_ssf.py``):

- in every chosen block, after ``qkv``, ``proj``, ``fc1``, ``fc2``, ``norm1`` and ``norm2`` (``targets``);
- once per model, whatever the chosen blocks: after the patch projection (per channel of the conv's output, before
  the patch-embedding norm; a second pair after that norm when the model has one) with ``patch_embed=True``, and
  after the final norm ``model.norm`` (on every token, before pooling) with ``final_norm=True``. Models that
  normalise after pooling (``fc_norm``) have an ``Identity`` there, and it gets its scale and shift all the same,
  as in the authors' code; ``fc_norm`` itself gets none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cil.layers._base import PEFTModule, unwrap, vit_blocks

SSF_TARGETS = ("qkv", "proj", "fc1", "fc2", "norm1", "norm2")


class ScaleShift(PEFTModule):
    """``base(x) * scale + shift`` over the last dimension, or over dimension 1 of a ``[B, C, H, W]`` output
    (``channels_first``, for a patch-embedding convolution)."""

    kind = "ssf"

    def __init__(self, base: nn.Module, dim: int, init_std: float = 0.02, channels_first: bool = False) -> None:
        super().__init__()
        self.base = base
        self.channels_first = channels_first
        self.scale = nn.Parameter(torch.ones(dim) + init_std * torch.randn(dim))
        self.shift = nn.Parameter(init_std * torch.randn(dim))

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if self.channels_first:
            return out * self.scale.view(-1, 1, 1) + self.shift.view(-1, 1, 1)  # [B, C, H, W]
        return out * self.scale + self.shift

    def extra_repr(self) -> str:
        return f"dim={self.scale.numel()}, channels_first={self.channels_first}"


def _out_dim(module: nn.Module) -> int:
    module = unwrap(module)
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[0])
    raise ValueError(f"SSF cannot follow a {type(module).__name__}")


def _inject_patch_embed(model: nn.Module, init_std: float) -> list[PEFTModule]:
    embed: Any = model.patch_embed
    proj = unwrap(embed.proj)
    if isinstance(proj, nn.Conv2d):
        dim, channels_first = proj.out_channels, True
    elif isinstance(proj, nn.Linear):
        dim, channels_first = proj.out_features, False
    else:
        raise ValueError(f"SSF cannot follow a {type(proj).__name__} patch projection; pass patch_embed=False")
    embed.proj = ScaleShift(embed.proj, dim, init_std, channels_first=channels_first)
    injected: list[PEFTModule] = [embed.proj]
    norm = getattr(embed, "norm", None)
    if isinstance(norm, nn.Module) and not isinstance(unwrap(norm), nn.Identity):
        embed.norm = ScaleShift(norm, dim, init_std)
        injected.append(embed.norm)
    return injected


def inject_ssf(
    model: nn.Module,
    blocks: list[int],
    targets: tuple[str, ...] = SSF_TARGETS,
    init_std: float = 0.02,
    patch_embed: bool = True,
    final_norm: bool = True,
) -> list[PEFTModule]:
    """Scale and shift after each of ``targets`` in each chosen block (default: all linear and norm layers), and,
    independently of ``blocks``, after the patch embedding (``patch_embed``) and the final norm (``final_norm``)."""
    unknown = set(targets) - set(SSF_TARGETS)
    if unknown:
        raise ValueError(f"unknown SSF targets {sorted(unknown)}; choose from {SSF_TARGETS}")
    vit: Any = model
    injected: list[PEFTModule] = _inject_patch_embed(model, init_std) if patch_embed else []
    for index in blocks:
        block: Any = vit_blocks(model)[index]
        mlp = unwrap(block.mlp)
        for name, parent in (("qkv", block.attn), ("proj", block.attn), ("fc1", mlp), ("fc2", mlp)):
            if name in targets:
                parent = unwrap(parent)
                wrapped = ScaleShift(getattr(parent, name), _out_dim(getattr(parent, name)), init_std)
                setattr(parent, name, wrapped)
                injected.append(wrapped)
        for name in ("norm1", "norm2"):
            if name in targets:
                wrapped = ScaleShift(getattr(block, name), _out_dim(getattr(block, name)), init_std)
                setattr(block, name, wrapped)
                injected.append(wrapped)
    if final_norm:
        if not isinstance(getattr(vit, "norm", None), nn.Module):
            raise ValueError(f"{type(model).__name__} has no final norm `.norm`; pass final_norm=False")
        vit.norm = ScaleShift(vit.norm, int(vit.embed_dim), init_std)
        injected.append(vit.norm)
    return injected
