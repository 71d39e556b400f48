"""A model's PEFT parameters as one flat vector: snapshot them, move them, and run the model with another set.

Methods that keep several versions of the same PEFT modules (MOS: one adapter per task; LAE: an online and an
offline module) store the other versions as flat buffers (they are checkpointed with the method) and run the model
with one of them through ``torch.func.functional_call``, so no module is copied and nothing is swapped in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from cil.layers._base import PEFTModule, vit_blocks


class FlatPEFT:
    """The parameters of the PEFT modules injected into ``model``, in a fixed order, viewed as one vector ``[P]``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        owned = {id(p) for m in model.modules() if isinstance(m, PEFTModule) for p in m.own_parameters()}
        self.names = [name for name, p in model.named_parameters() if id(p) in owned]
        if not self.names:
            raise ValueError("the model has no injected PEFT modules; call cil.layers.inject first")

    def parameters(self) -> list[nn.Parameter]:
        params = dict(self.model.named_parameters())
        return [params[name] for name in self.names]

    def block_of_values(self) -> torch.Tensor:
        """The index of the ViT block that holds each value of the vector ``[P]`` (MOS pulls adapters block by
        block); raises if a PEFT parameter lies outside the blocks (SSF after the patch embedding, say)."""
        blocks = vit_blocks(getattr(self.model, "model", self.model))
        owner = {id(p): index for index, block in enumerate(blocks) for p in block.parameters()}
        indices = []
        for name, param in zip(self.names, self.parameters(), strict=True):
            if id(param) not in owner:
                raise ValueError(f"PEFT parameter {name!r} is not inside a ViT block")
            indices.append(torch.full((param.numel(),), owner[id(param)], dtype=torch.long))
        return torch.cat(indices)

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def vector(self) -> torch.Tensor:
        """A detached copy of the current values ``[P]``."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])

    def _views(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        if vector.numel() != self.numel():
            raise ValueError(f"expected a vector of {self.numel()} PEFT values, got {vector.numel()}")
        views, offset = {}, 0
        for name, param in zip(self.names, self.parameters(), strict=True):
            views[name] = vector[offset : offset + param.numel()].view_as(param).to(param)
            offset += param.numel()
        return views

    @torch.no_grad()
    def lerp_(self, target: torch.Tensor, weight: float) -> None:
        """``p <- p + weight * (target - p)`` on the live parameters, in place."""
        offset = 0
        for param in self.parameters():
            param.lerp_(target[offset : offset + param.numel()].view_as(param).to(param), weight)
            offset += param.numel()

    def run_with(self, vector: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with the PEFT parameters taken from ``vector`` instead of the live ones."""
        return functional_call(self.model, self._views(vector), args, kwargs, strict=False)
