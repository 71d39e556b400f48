"""LoRA (Hu et al., ICLR 2022) on the projections of timm ViT blocks, including q, k, v of the fused ``qkv``.

timm computes q, k and v with one ``Linear(D, 3D)``; :class:`LoRALinear` adds a low-rank update to chosen row
slices of such a layer, so LoRA can target K and V only (as LAE does) without splitting the layer. ``B`` starts
at zero (the injected model equals the pre-trained one), ``A`` Kaiming-uniform as in the reference code, and
:meth:`LoRALinear.merge` folds ``scale * B @ A`` into the frozen weight.

``peft`` was evaluated: its LoRA wraps whole ``nn.Linear`` modules, so on timm's fused ``qkv`` it would adapt q,
k and v together; LAE's K/V-only placement needs per-slice updates, hence these few lines.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cil.layers._base import PEFTModule, unwrap, vit_blocks

_QKV_SLICES = {"q": 0, "k": 1, "v": 2}


class LoRALinear(PEFTModule):
    """``y = base(x) + scale * B_t diag(w_t) A_t dropout(x)`` on each target row slice ``t`` of ``base``'s output.

    ``gated=True`` adds CoDyRA's learnable gate ``w_t`` per rank (initialised ``N(0, 1)`` as in the authors' code);
    :meth:`soft_threshold_` prunes it and :meth:`active_ranks` counts what survives. Without gates ``w_t = 1``.
    ``learn_scale=True`` learns ``scale`` per slice from ``alpha / rank`` (LAE's code: one learned scalar each for K
    and V, from 1).
    """

    kind = "lora"

    def __init__(
        self,
        base: nn.Linear,
        slices: dict[str, tuple[int, int]],
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        gated: bool = False,
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        self.base = base
        self.slices = dict(slices)
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_gate = nn.ParameterDict()
        self.lora_scale = nn.ParameterDict()  # learned scales, when asked for
        for name, (start, stop) in self.slices.items():
            a = torch.empty(rank, base.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)  # [r, D_in]
            self.lora_B[name] = nn.Parameter(torch.zeros(stop - start, rank))  # [D_slice, r]
            if gated:
                self.lora_gate[name] = nn.Parameter(torch.randn(rank))  # [r]
            if learn_scale:
                self.lora_scale[name] = nn.Parameter(torch.tensor(self.scale))  # []
        self.merged = False

    def _scale(self, name: str) -> float | torch.Tensor:
        return self.lora_scale.get(name, self.scale)

    def _down(self, name: str) -> torch.Tensor:
        """``diag(w) A``: the gated down-projection ``[r, D_in]``."""
        a = self.lora_A[name]
        return a * self.lora_gate[name][:, None] if name in self.lora_gate else a

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update as a full ``[D_out, D_in]`` matrix."""
        delta = self.base.weight.new_zeros(self.base.weight.shape)
        for name, (start, stop) in self.slices.items():
            delta[start:stop] = self.lora_B[name] @ self._down(name) * self._scale(name)
        return delta

    @torch.no_grad()
    def soft_threshold_(self, kappa: float) -> None:
        """The proximal step of an L1 penalty on the gates: ``w <- sign(w) max(|w| - kappa, 0)``."""
        for gate in self.lora_gate.values():
            gate.copy_(torch.sign(gate) * (gate.abs() - kappa).clamp(min=0))

    def active_ranks(self) -> dict[str, int]:
        """Per target slice, the ranks still in use: nonzero gates (all ``rank`` when ungated)."""
        return {
            name: int((self.lora_gate[name] != 0).sum()) if name in self.lora_gate else self.rank
            for name in self.slices
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # [..., D_out]
        if self.merged:
            return out
        h = self.dropout(x)
        updates = [out]
        for name, (start, stop) in self.slices.items():
            update = F.linear(F.linear(h, self._down(name)), self.lora_B[name]) * self._scale(name)  # [..., D_slice]
            updates.append(F.pad(update, (start, out.shape[-1] - stop)))
        return torch.stack(updates).sum(0)

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the update into the frozen weight (exact up to float rounding) and resets it to zero, so the
        module can keep training a fresh update on top (as rank-selective LoRA does after every task)."""
        self.base.weight += self.delta_weight()
        for name in self.slices:
            self.lora_B[name].zero_()


def inject_lora(
    model: nn.Module,
    blocks: list[int],
    targets: tuple[str, ...] = ("q", "v"),
    rank: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    gated: bool = False,
    learn_scale: bool = False,
) -> list[PEFTModule]:
    """LoRA on ``targets`` of each chosen block: any of ``q``, ``k``, ``v`` (slices of ``attn.qkv``), ``proj``
    (attention output), ``fc1``, ``fc2`` (MLP). ``gated``: a learnable gate per rank (CoDyRA); ``learn_scale``: a
    learned scale per target (LAE)."""
    unknown = set(targets) - {*_QKV_SLICES, "proj", "fc1", "fc2"}
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from q, k, v, proj, fc1, fc2")
    injected: list[PEFTModule] = []
    for index in blocks:
        block: Any = vit_blocks(model)[index]
        qkv_targets = [t for t in targets if t in _QKV_SLICES]
        if qkv_targets:
            dim = block.attn.qkv.out_features // 3
            slices = {t: (_QKV_SLICES[t] * dim, (_QKV_SLICES[t] + 1) * dim) for t in qkv_targets}
            block.attn.qkv = LoRALinear(block.attn.qkv, slices, rank, alpha, dropout, gated, learn_scale)
            injected.append(block.attn.qkv)
        mlp = unwrap(block.mlp)  # the MLP itself, also when an adapter sits beside it
        for name, parent in (("proj", block.attn), ("fc1", mlp), ("fc2", mlp)):
            if name in targets:
                layer = getattr(parent, name)
                wrapped = LoRALinear(layer, {"all": (0, layer.out_features)}, rank, alpha, dropout, gated, learn_scale)
                setattr(parent, name, wrapped)
                injected.append(wrapped)
    return injected


class _AddLoRA(nn.Module):
    """A parametrization ``W -> W + delta`` whose delta is a :class:`LoRALinear`'s, for weights that are not the
    ``weight`` of a called ``nn.Linear`` (``nn.MultiheadAttention.in_proj_weight``, which open_clip uses)."""

    def __init__(self, lora: LoRALinear) -> None:
        super().__init__()
        self.lora = lora

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.lora.delta_weight().to(weight)


def inject_lora_open_clip(
    model: nn.Module,
    targets: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2"),
    rank: int = 16,
    alpha: float = 16.0,
    gated: bool = False,
    towers: tuple[str, ...] = ("visual", "text"),
) -> list[PEFTModule]:
    """LoRA on every residual block of an open_clip CLIP's image and / or text transformer, as weight
    parametrizations (``q``, ``k``, ``v``: row slices of ``attn.in_proj_weight``; ``proj``: ``attn.out_proj``;
    ``fc1`` / ``fc2``: ``mlp.c_fc`` / ``mlp.c_proj``). :func:`cil.layers.unload_lora` merges and removes them."""
    from torch.nn.utils import parametrize

    transformers = {"visual": getattr(getattr(model, "visual", None), "transformer", None)}
    transformers["text"] = getattr(model, "transformer", None)
    injected: list[PEFTModule] = []
    for tower in towers:
        transformer = transformers.get(tower)
        if transformer is None:
            raise ValueError(f"the CLIP model has no {tower} transformer (choose towers from visual, text)")
        for block in transformer.resblocks:
            dim = block.attn.embed_dim
            places: list[tuple[nn.Module, str, dict[str, tuple[int, int]]]] = []
            qkv = {t: (_QKV_SLICES[t] * dim, (_QKV_SLICES[t] + 1) * dim) for t in targets if t in _QKV_SLICES}
            if qkv:
                places.append((block.attn, "in_proj_weight", qkv))
            for name, (parent, attribute) in {
                "proj": (block.attn.out_proj, "weight"), "fc1": (block.mlp.c_fc, "weight"),
                "fc2": (block.mlp.c_proj, "weight"),
            }.items():  # fmt: skip
                if name in targets:
                    places.append((parent, attribute, {"all": (0, getattr(parent, attribute).shape[0])}))
            for parent, attribute, slices in places:
                weight = getattr(parent, attribute)  # [D_out, D_in]
                holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
                holder.weight = weight  # the same frozen parameter: no copy
                lora = LoRALinear(holder, slices, rank, alpha, 0.0, gated).to(weight.device)
                parametrize.register_parametrization(parent, attribute, _AddLoRA(lora), unsafe=True)
                injected.append(lora)
    return injected
