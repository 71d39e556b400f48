"""SSF (Lian et al., NeurIPS 2022): a learned per-channel scale and shift after chosen operations.

``y = op(x) * gamma + beta``. The paper initialises ``gamma ~ N(1, std)`` and ``beta ~ N(0, std)`` with
``std = 0.02``; ``init_std=0`` starts exactly at the pre-trained model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cil.layers._base import PEFTModule, unwrap, vit_blocks

SSF_TARGETS = ("qkv", "proj", "fc1", "fc2", "norm1", "norm2")


class ScaleShift(PEFTModule):
    kind = "ssf"

    def __init__(self, base: nn.Module, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(torch.ones(dim) + init_std * torch.randn(dim))
        self.shift = nn.Parameter(init_std * torch.randn(dim))

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.base(x, *args, **kwargs) * self.scale + self.shift


def _out_dim(module: nn.Module) -> int:
    module = unwrap(module)
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[0])
    raise ValueError(f"SSF cannot follow a {type(module).__name__}")


def inject_ssf(
    model: nn.Module, blocks: list[int], targets: tuple[str, ...] = SSF_TARGETS, init_std: float = 0.02
) -> list[PEFTModule]:
    """Scale and shift after each of ``targets`` in each chosen block (default: all linear and norm layers)."""
    unknown = set(targets) - set(SSF_TARGETS)
    if unknown:
        raise ValueError(f"unknown SSF targets {sorted(unknown)}; choose from {SSF_TARGETS}")
    injected: list[PEFTModule] = []
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
    return injected
