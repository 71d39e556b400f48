"""Learned tokens: prefix tuning (Li & Liang 2021) and visual prompt tuning, shallow and deep (Jia et al. 2022).

Prefix tuning prepends learned keys and values to every chosen block's attention (the queries and the token
sequence are unchanged).

VPT follows the VPT ViT that APER trains (LAMDA-PILOT ``backbone/vpt.py``): prompt tokens without position
embeddings are appended after the patch tokens, *shallow* once before the first block, *deep* replaced by fresh ones
before every chosen block; their outputs are dropped after the last block, before the final norm, so the model's
pooling (class token for APER's ViT-B/16, or the average of the patch tokens) never sees them. The defaults are the
authors': prompts start at zero and have no dropout (the VPT paper: uniform init, ``init="uniform"``; its released
runs: prompt dropout 0.1, ``dropout=0.1``). Zero prompts are not an identity: a zero token normalises to the
LayerNorm's bias, and the other tokens attend to it. Where the prompts sit in the sequence does not matter: a ViT
block without attention masks or rotary embeddings treats its tokens as a set, and the VPT paper's layout (right
after the class token) gives the same features up to rounding. With deep prompts in only some of the blocks, the
last prompted block's prompt outputs flow on through the unprompted blocks after it until they are dropped, as in
the VPT paper's code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cil.layers._base import PEFTModule, vit_blocks


class PrefixAttention(PEFTModule):
    """timm ``Attention`` whose keys and values get ``length`` learned prefix tokens per head.

    Defaults: prefixes drawn from U(-1/sqrt(D), 1/sqrt(D)), used as they are. LAE's code (``libml/model/pet/prefix.py``)
    instead draws them from U(0, 0.01) (``init_bounds=(0.0, 0.01)``), multiplies keys and values each by a scalar
    learned from 1 (``learn_scale``) and *compensates* the attention (``compensate``): after the softmax over prefix and
    token keys, the prefix weights are divided by their sum, so the prefix values enter as one weighted mean with the
    full weight 1 while the tokens keep their softmax weights.
    """

    kind = "prefix"

    def __init__(
        self,
        base: nn.Module,
        length: int = 10,
        init_bounds: tuple[float, float] | None = None,
        learn_scale: bool = False,
        compensate: bool = False,
    ) -> None:
        super().__init__()
        self.base = base
        attn: Any = base
        dim = int(attn.num_heads * attn.head_dim)
        low, high = init_bounds if init_bounds is not None else (-math.sqrt(1 / dim), math.sqrt(1 / dim))
        self.prefix_key = nn.Parameter(torch.empty(length, dim).uniform_(low, high))  # [P, D]
        self.prefix_value = nn.Parameter(torch.empty(length, dim).uniform_(low, high))
        self.key_scale = nn.Parameter(torch.tensor(1.0)) if learn_scale else None
        self.value_scale = nn.Parameter(torch.tensor(1.0)) if learn_scale else None
        self.compensate = compensate

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("prefix tuning does not support attention masks")
        key = self.prefix_key if self.key_scale is None else self.prefix_key * self.key_scale
        value = self.prefix_value if self.value_scale is None else self.prefix_value * self.value_scale
        return prefixed_attention(self.base, x, key[None], value[None], self.compensate, self.training)


def prefixed_attention(
    attn: Any,
    x: torch.Tensor,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    compensate: bool = False,
    training: bool = False,
) -> torch.Tensor:
    """timm ``Attention`` on tokens ``x [B, N, D]`` whose keys and values are preceded by ``prefix_key`` and
    ``prefix_value`` (``[B, P, D]`` per image, or ``[1, P, D]`` for every image), split into heads as the tokens'
    keys and values are. ``compensate``: LAE's renormalised attention on the prefix (:class:`PrefixAttention`)."""
    B, N, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim

    q, k, v = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # each [B, H, N, d]

    def split(prefix: torch.Tensor) -> torch.Tensor:  # [B or 1, P, D] -> [B, H, P, d]
        return prefix.to(k.dtype).unflatten(-1, (heads, head_dim)).transpose(1, 2).expand(B, -1, -1, -1)

    q, k = attn.q_norm(q), attn.k_norm(k)
    k, v = torch.cat([split(prefix_key), k], dim=2), torch.cat([split(prefix_value), v], dim=2)  # [B, H, P + N, d]
    dropout = attn.attn_drop.p if training else 0.0
    if compensate:
        weights = torch.softmax(q @ k.transpose(-2, -1) * head_dim**-0.5, dim=-1)  # [B, H, N, P + N]
        weights = F.dropout(weights, dropout, training)
        length = prefix_key.shape[1]
        on_prefix = weights[..., :length]
        weights = torch.cat([on_prefix / on_prefix.sum(-1, keepdim=True).clamp(min=1e-12), weights[..., length:]], -1)
        out = weights @ v  # [B, H, N, d]
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, heads * head_dim))
    return attn.proj_drop(attn.proj(out))


class PrefixSlot(nn.Module):
    """A timm ``Attention`` that takes per-image key / value prefixes for one forward (DualPrompt's and CODA-Prompt's
    prompts, which a pool chooses per image) and is the plain attention otherwise.

    The slot owns no parameters: the method computes the prefixes and hands them over with :func:`prefixes_set`, so
    the query pass of the same frozen model runs unprompted.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # ([B, P, D], [B, P, D]) for this forward

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.prefix is None:
            return self.base(x, attn_mask=attn_mask) if attn_mask is not None else self.base(x)
        if attn_mask is not None or is_causal:
            raise ValueError("prefix tuning does not support attention masks")
        return prefixed_attention(self.base, x, *self.prefix, training=self.training)


def inject_prefix_slots(model: nn.Module, blocks: list[int]) -> dict[int, PrefixSlot]:
    """Wraps the attention of each chosen block of a timm ViT in a :class:`PrefixSlot`; returns them by block."""
    slots: dict[int, PrefixSlot] = {}
    for index in blocks:
        block: Any = vit_blocks(model)[index]
        if not isinstance(block.attn, PrefixSlot):
            block.attn = PrefixSlot(block.attn)
        slots[index] = block.attn
    return slots


@contextlib.contextmanager
def prefixes_set(
    slots: dict[int, PrefixSlot], prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[None]:
    """Gives each block in ``prefixes`` its ``(keys [B, P, D], values [B, P, D])`` for the forwards inside the block,
    and takes them back after (also on error), so that no later forward sees them."""
    unknown = sorted(set(prefixes) - set(slots))
    if unknown:
        raise KeyError(f"blocks {unknown} have no prefix slot; slots are at {sorted(slots)}")
    try:
        for index, prefix in prefixes.items():
            slots[index].prefix = prefix
        yield
    finally:
        for index in prefixes:
            slots[index].prefix = None


class PromptedBlock(PEFTModule):
    """A block that appends (first prompted block), replaces (deep) and/or drops (last block) prompt tokens.

    Token layout while prompted: ``[prefix tokens (cls, registers) | patch tokens | prompts]``.
    """

    kind = "vpt"

    def __init__(
        self,
        base: nn.Module,
        prompts: nn.Parameter | None,
        num_prompts: int,
        insert: bool,
        remove: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base = base
        self.prompts = prompts  # [T, D] or None for a block that only removes
        self.num_prompts = num_prompts
        self.insert, self.remove = insert, remove
        self.dropout = dropout

    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if self.prompts is not None:
            prompts: torch.Tensor = self.prompts
            if self.dropout > 0:  # not a module call on the parameter: torch's module tracker (FLOP counting) fails
                prompts = F.dropout(prompts, self.dropout, self.training)
            prompts = prompts.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)  # [B, T, D]
            x = torch.cat([x if self.insert else x[:, : -self.num_prompts], prompts], dim=1)  # [B, N + T, D]
        x = self.base(x, **kwargs)
        if self.remove:
            x = x[:, : -self.num_prompts]  # [B, N, D]
        return x


def inject_prefix(
    model: nn.Module,
    blocks: list[int],
    length: int = 10,
    init_bounds: tuple[float, float] | None = None,
    learn_scale: bool = False,
    compensate: bool = False,
) -> list[PEFTModule]:
    """Learned key/value prefixes of ``length`` tokens in each chosen block's attention (see :class:`PrefixAttention`
    for the rest)."""
    injected: list[PEFTModule] = []
    for index in blocks:
        block: Any = vit_blocks(model)[index]
        block.attn = PrefixAttention(block.attn, length, init_bounds, learn_scale, compensate)
        injected.append(block.attn)
    return injected


VPT_INITS = ("zeros", "uniform")


def inject_vpt(
    model: nn.Module,
    blocks: list[int],
    num_tokens: int = 5,
    deep: bool = False,
    init: str = "zeros",
    dropout: float = 0.0,
) -> list[PEFTModule]:
    """Visual prompt tuning: ``num_tokens`` prompts before the first chosen block (shallow) or fresh ones before every
    chosen block (deep); their outputs are dropped after the last block.

    Args:
        model: A timm ``VisionTransformer``.
        blocks: The blocks that get prompts (deep), or whose first one does (shallow).
        num_tokens: Prompt tokens per prompted block (APER: 5).
        deep: Fresh prompts at every chosen block instead of once.
        init: ``"zeros"`` (APER's code) or ``"uniform"`` in ``+-sqrt(6 / (3 p^2 + D))`` (the VPT paper).
        dropout: Dropout on the prompt tokens as they are inserted (APER's code: none; the VPT paper's runs: 0.1).
    """
    if init not in VPT_INITS:
        raise ValueError(f"VPT init must be one of {VPT_INITS}, got {init!r}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
    vit: Any = model
    model_blocks = vit_blocks(model)
    dim, patch = vit.embed_dim, vit.patch_embed.patch_size[0]
    bound = math.sqrt(6.0 / (3 * patch * patch + dim))
    prompted = blocks if deep else blocks[:1]
    last = len(model_blocks) - 1
    injected: list[PEFTModule] = []
    for position, index in enumerate(range(blocks[0], last + 1)):
        prompts = None
        if index in prompted:
            prompts = nn.Parameter(torch.zeros(num_tokens, dim))  # [T, D]
            if init == "uniform":
                nn.init.uniform_(prompts, -bound, bound)
        if prompts is None and index != last:
            continue
        wrapped = PromptedBlock(
            model_blocks[index], prompts, num_tokens, insert=position == 0, remove=index == last, dropout=dropout
        )
        model_blocks[index] = wrapped
        injected.append(wrapped)
    return injected
