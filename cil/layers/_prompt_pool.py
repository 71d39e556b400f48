"""A pool of prompts chosen per image by key matching (L2P, Wang et al., CVPR 2022), and the prompted ViT forward.

Each image's *query* is the frozen pre-trained ViT's final-norm [CLS] feature. Every prompt of the pool has a learned
key; the image takes the ``top_k`` prompts whose keys are nearest to its query (cosine), prepends their tokens to its
patch tokens, and the key-matching ("pull") term ``sum of the chosen keys' cosines, averaged over the batch`` is
added to the loss with a negative sign so that chosen keys move toward their queries. Facts from L2P's PyTorch port
and LAMDA-PILOT (``backbone/prompt.py`` ``Prompt``, identical in both): keys and prompts start from U(-1, 1); keys
and queries are L2-normalised with ``x / sqrt(max(sum x^2, 1e-12))``; the chosen prompts enter after the class token
with the class token's position embedding added (their ViT resizes its position table by repeating the class
token's entry over the prompt slots); the classifier reads the mean of the prompt tokens' outputs after the final
norm (``head_type: prompt``).

Selection is per image. Their code also offers, and their configs turn on, *batch-wise* selection (the ``top_k``
prompts chosen most often in the batch serve every image of it), at test time too: with test batches drawn from one
task, as their class-sorted test loaders give, it lets the batch vote on the task, which a single test image cannot
do. Here it is ``batchwise=False`` by default and only a named option.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``x / sqrt(max(sum x^2, eps))`` along ``dim``, as L2P's code normalises keys and queries."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=dim, keepdim=True), min=eps))


class PromptPool(nn.Module):
    """``pool_size`` prompts of ``length`` tokens, each with a key; :meth:`select` picks ``top_k`` per image.

    Args:
        dim: Token width ``D`` of the ViT.
        pool_size: Prompts in the pool (L2P: 10).
        length: Tokens per prompt (L2P: 5).
        top_k: Prompts per image (L2P: 5).
        batchwise: Let the whole batch vote (see the module docstring); off by default, as it leaks task identity.
    """

    def __init__(self, dim: int, pool_size: int = 10, length: int = 5, top_k: int = 5, batchwise: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k must be between 1 and pool_size ({pool_size}), got {top_k}")
        self.top_k, self.batchwise = top_k, batchwise
        self.keys = nn.Parameter(torch.empty(pool_size, dim).uniform_(-1.0, 1.0))  # [P, D]
        self.prompts = nn.Parameter(torch.empty(pool_size, length, dim).uniform_(-1.0, 1.0))  # [P, L, D]

    def select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``query [B, D]`` -> ``(tokens [B, top_k * L, D], chosen ids [B, top_k], pull term [])``."""
        keys, query = l2_normalize(self.keys, dim=1), l2_normalize(query, dim=1)
        similarity = query @ keys.T  # [B, P]
        chosen = similarity.topk(self.top_k, dim=1).indices  # [B, k]
        if self.batchwise:  # the k prompts chosen most often in the batch, for every image of it
            ids, counts = torch.unique(chosen, return_counts=True)
            chosen = ids[counts.topk(min(self.top_k, len(ids))).indices].expand(len(query), -1)
        pull = (keys[chosen] * query[:, None, :]).sum() / len(query)  # mean over images of the summed cosines
        tokens = self.prompts[chosen].flatten(1, 2)  # [B, k * L, D]
        return tokens, chosen, pull


def prompted_tokens(vit: Any, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """A timm ``VisionTransformer``'s output tokens after its final norm, ``[B, 1 + T_p + N, D]``, with ``prompts``
    ``[B, T_p, D]`` inserted right after the class (and register) tokens, each plus the class token's position
    embedding (L2P's layout). The model's own blocks and norms run unchanged."""
    x = vit._pos_embed(vit.patch_embed(images))  # [B, prefix + N, D], position embeddings added
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    if vit.pos_embed is not None and not getattr(vit, "no_embed_class", False):
        prompts = prompts + vit.pos_embed[:, :1]  # the class token's position
    x = torch.cat([x[:, :prefix], prompts.to(x.dtype), x[:, prefix:]], dim=1)
    x = vit.norm_pre(vit.patch_drop(x))
    return vit.norm(vit.blocks(x))
