"""Learned tokens: prefix tuning (Li & Liang 2021) and visual prompt tuning, shallow and deep (Jia et al. 2022).

Prefix tuning prepends learned keys and values to every chosen block's attention (the queries and the token
sequence are unchanged). VPT inserts learned tokens into the sequence after the class/register tokens: *shallow*
once before the first block, *deep* replaced by fresh ones before every chosen block; they are removed after the
last block, so the model's pooling (class token or average of patch tokens) sees the usual tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cil.layers._base import PEFTModule, vit_blocks


class PrefixAttention(PEFTModule):
    """timm ``Attention`` whose keys and values get ``length`` learned prefix tokens per head."""

    kind = "prefix"

    def __init__(self, base: nn.Module, length: int = 10) -> None:
        super().__init__()
        self.base = base
        attn: Any = base
        dim = int(attn.num_heads * attn.head_dim)
        self.prefix_key = nn.Parameter(torch.zeros(length, dim))  # [P, D]
        self.prefix_value = nn.Parameter(torch.zeros(length, dim))
        nn.init.uniform_(self.prefix_key, -math.sqrt(1 / dim), math.sqrt(1 / dim))
        nn.init.uniform_(self.prefix_value, -math.sqrt(1 / dim), math.sqrt(1 / dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("prefix tuning does not support attention masks")
        attn: Any = self.base
        B, N, _ = x.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        q, k, v = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # each [B, H, N, d]
        q, k = attn.q_norm(q), attn.k_norm(k)
        prefix_k = self.prefix_key.view(1, -1, heads, head_dim).transpose(1, 2).expand(B, -1, -1, -1)  # [B, H, P, d]
        prefix_v = self.prefix_value.view(1, -1, heads, head_dim).transpose(1, 2).expand(B, -1, -1, -1)
        k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)  # [B, H, P + N, d]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0)
        out = attn.norm(out.transpose(1, 2).reshape(B, N, heads * head_dim))
        return attn.proj_drop(attn.proj(out))


class PromptedBlock(PEFTModule):
    """A block that inserts (first prompted block), replaces (deep) and/or removes (last block) prompt tokens.

    Token layout while prompted: ``[prefix tokens (cls, registers) | prompts | patch tokens]``.
    """

    kind = "vpt"

    def __init__(
        self,
        base: nn.Module,
        prompts: nn.Parameter | None,
        num_prefix: int,
        num_prompts: int,
        insert: bool,
        remove: bool,
    ) -> None:
        super().__init__()
        self.base = base
        self.prompts = prompts  # [T, D] or None for a block that only removes
        self.num_prefix, self.num_prompts = num_prefix, num_prompts
        self.insert, self.remove = insert, remove

    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if self.prompts is not None:
            prompts = self.prompts.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)  # [B, T, D]
            head, tail = x[:, : self.num_prefix], x[:, self.num_prefix + (0 if self.insert else self.num_prompts) :]
            x = torch.cat([head, prompts, tail], dim=1)
        x = self.base(x, **kwargs)
        if self.remove:
            x = torch.cat([x[:, : self.num_prefix], x[:, self.num_prefix + self.num_prompts :]], dim=1)
        return x


def inject_prefix(model: nn.Module, blocks: list[int], length: int = 10) -> list[PEFTModule]:
    """Learned key/value prefixes of ``length`` tokens in each chosen block's attention."""
    injected: list[PEFTModule] = []
    for index in blocks:
        block: Any = vit_blocks(model)[index]
        block.attn = PrefixAttention(block.attn, length)
        injected.append(block.attn)
    return injected


def inject_vpt(model: nn.Module, blocks: list[int], num_tokens: int = 5, deep: bool = False) -> list[PEFTModule]:
    """Visual prompt tuning: ``num_tokens`` prompts before the first chosen block (shallow) or before every chosen
    block (deep). APER uses 5 tokens. Prompts start uniform in ``+-sqrt(6 / (3 p^2 + D))`` as in VPT."""
    vit: Any = model
    model_blocks = vit_blocks(model)
    dim, patch, num_prefix = vit.embed_dim, vit.patch_embed.patch_size[0], vit.num_prefix_tokens
    bound = math.sqrt(6.0 / (3 * patch * patch + dim))
    prompted = blocks if deep else blocks[:1]
    last = len(model_blocks) - 1
    injected: list[PEFTModule] = []
    for position, index in enumerate(range(blocks[0], last + 1)):
        prompts = None
        if index in prompted:
            prompts = nn.Parameter(torch.empty(num_tokens, dim).uniform_(-bound, bound))
        if prompts is None and index != last:
            continue
        insert = position == 0
        wrapped = PromptedBlock(
            model_blocks[index], prompts, num_prefix, num_tokens, insert=insert, remove=index == last
        )
        model_blocks[index] = wrapped
        injected.append(wrapped)
    return injected
