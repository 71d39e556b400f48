"""AdaptFormer adapter (Chen et al., NeurIPS 2022): a bottleneck in parallel to each block's MLP.

``mlp'(h) = mlp(h) + s * up(relu(down(h)))`` with ``h = norm2(x)`` (the paper's Eq. 3: the adapter reads the
same normalised tokens as the MLP). ``up`` starts at zero, so the injected model equals the pre-trained one at
step 0. On LayerScale models (DINOv2) the adapter's output is added *after* the block's ``ls2``, as in the paper's
``x + MLP + s * adapter``: inside it, LayerScale's small gammas (1e-5 at init) would silence the adapter.
LAMDA-PILOT's APER feeds the un-normalised residual stream instead; both are bottlenecks of the same size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cil.layers._base import PEFTModule, vit_blocks

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class Adapter(PEFTModule):
    """``up(dropout(act(down(h)))) * scale``, ``[B, N, D] -> [B, N, D]``.

    AdaptFormer (APER, MOS): ReLU and a fixed ``scale``. LAE's code: GELU and a ``scale`` learned from 1
    (``activation="gelu", learn_scale=True``).
    """

    kind = "adapter"

    def __init__(
        self,
        dim: int,
        bottleneck: int = 64,
        scale: float = 0.1,
        dropout: float = 0.1,
        activation: str = "relu",
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"adapter activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale: float | nn.Parameter = nn.Parameter(torch.tensor(float(scale))) if learn_scale else scale
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """AdaptFormer's "lora" init: ``down`` Kaiming-uniform, ``up`` and both biases zero, so the adapter adds
        exact zeros until it is trained (EASE starts every task's adapter from here)."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(h)))) * self.scale


class MLPWithAdapter(PEFTModule):
    """A block's MLP (or, with ``position="attn"``, its attention) with an :class:`Adapter` beside it, both reading
    the same normalised tokens.

    With ``after_layer_scale`` the adapter's output is handed to the block's :class:`LayerScaleThenAdd` instead of
    being summed here (the block calls ``ls(mlp(h))``, so that is the only place after the scaling).
    """

    kind = "adapter"

    def __init__(self, base: nn.Module, adapter: Adapter, after_layer_scale: bool = False) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.after_layer_scale = after_layer_scale
        self.pending: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.after_layer_scale:
            self.pending = self.adapter(h)
            return self.base(h, *args, **kwargs)
        return self.base(h, *args, **kwargs) + self.adapter(h)


class LayerScaleThenAdd(nn.Module):
    """``ls2(y) + adapter output`` for LayerScale blocks; the adapter output comes from the paired MLP wrapper."""

    def __init__(self, base: nn.Module, mlp: MLPWithAdapter) -> None:
        super().__init__()
        self.base = base
        self.__dict__["mlp"] = mlp  # a reference, not a submodule: its parameters live under block.mlp

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        mlp: MLPWithAdapter = self.__dict__["mlp"]
        pending, mlp.pending = mlp.pending, None
        if pending is None:
            raise RuntimeError("LayerScaleThenAdd ran without its MLP; the block's forward order is not timm's")
        return self.base(y) + pending


def inject_adapter(
    model: nn.Module,
    blocks: list[int],
    bottleneck: int = 64,
    scale: float = 0.1,
    dropout: float = 0.1,
    position: str = "mlp",
    activation: str = "relu",
    learn_scale: bool = False,
) -> list[PEFTModule]:
    """Puts an adapter beside the MLP (``position="mlp"``, AdaptFormer; APER uses bottleneck 64, MOS 16) or beside
    the attention (``position="attn"``, as LAE's code) of each chosen block; see :class:`Adapter` for the rest."""
    slots = {"mlp": ("mlp", "norm2", "ls2"), "attn": ("attn", "norm1", "ls1")}
    if position not in slots:
        raise ValueError(f"adapter position must be 'mlp' or 'attn', got {position!r}")
    branch, norm, layer_scale = slots[position]
    injected: list[PEFTModule] = []
    for index in blocks:
        block: Any = vit_blocks(model)[index]
        dim = getattr(block, norm).normalized_shape[0]
        layer_scaled = not isinstance(getattr(block, layer_scale), nn.Identity)
        wrapped = MLPWithAdapter(
            getattr(block, branch),
            Adapter(dim, bottleneck, scale, dropout, activation, learn_scale),
            after_layer_scale=layer_scaled,
        )
        setattr(block, branch, wrapped)
        if layer_scaled:
            setattr(block, layer_scale, LayerScaleThenAdd(getattr(block, layer_scale), wrapped))
        injected.append(wrapped)
    return injected
