"""Prompt pools: prompts chosen per image by key matching (L2P, Wang et al., CVPR 2022; DualPrompt's E-prompts,
Wang et al., ECCV 2022), prompt components weighted per image (CODA-Prompt, Smith et al., CVPR 2023), and the
prompted ViT forward of L2P. DualPrompt and CODA-Prompt hand their prompts to the attention as prefixes
(:class:`cil.layers.PrefixSlot`).

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
import torch.nn.functional as F
from torch import nn


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``x / sqrt(max(sum x^2, eps))`` along ``dim``, as L2P's code normalises keys and queries."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=dim, keepdim=True), min=eps))


class PromptPool(nn.Module):
    """``pool_size`` prompts, each with a key; :meth:`select` picks ``top_k`` per image.

    A prompt is ``length`` tokens prepended to the input (L2P's prompt tuning), or with ``prefix_layers = n`` a
    key prefix and a value prefix of ``length`` tokens each for ``n`` attention layers (DualPrompt's E-prompts).

    Args:
        dim: Token width ``D`` of the ViT.
        pool_size: Prompts in the pool (L2P and DualPrompt: 10).
        length: Tokens per prompt (L2P: 5), or per key / value prefix.
        top_k: Prompts per image (L2P: 5, DualPrompt: 1).
        batchwise: Let the whole batch vote (see the module docstring); off by default, as it leaks task identity.
        prefix_layers: 0 for prompt tokens ``[L, D]``; else prefixes ``[n, 2, L, D]`` (key, value) per prompt.
    """

    def __init__(
        self,
        dim: int,
        pool_size: int = 10,
        length: int = 5,
        top_k: int = 5,
        batchwise: bool = False,
        prefix_layers: int = 0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k must be between 1 and pool_size ({pool_size}), got {top_k}")
        self.top_k, self.batchwise = top_k, batchwise
        shape = (prefix_layers, 2, length, dim) if prefix_layers else (length, dim)
        self.keys = nn.Parameter(torch.empty(pool_size, dim).uniform_(-1.0, 1.0))  # [P, D]
        self.prompts = nn.Parameter(torch.empty(pool_size, *shape).uniform_(-1.0, 1.0))  # [P, L, D] / [P, n, 2, L, D]

    def select(
        self, query: torch.Tensor, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``query [B, D]`` -> ``(prompts [B, top_k, ...], chosen ids [B, top_k], pull term [])``.

        ``ids [B, top_k]`` imposes the prompts instead of matching (DualPrompt's task-identity prompt at training
        time); the pull term is then over the imposed keys, which it draws toward their images' queries."""
        keys, query = l2_normalize(self.keys, dim=1), l2_normalize(query, dim=1)
        if ids is not None:
            chosen = ids
        else:
            similarity = query @ keys.T  # [B, P]
            chosen = similarity.topk(self.top_k, dim=1).indices  # [B, k]
            if self.batchwise:  # the k prompts chosen most often in the batch, for every image of it
                unique, counts = torch.unique(chosen, return_counts=True)
                missing = len(self.keys) - len(unique)  # padded to the pool's size with uncounted entries, as
                if missing > 0:  # their code does before its topk: ties between votes break as theirs
                    unique = torch.cat([unique, unique.new_full((missing,), int(chosen.min()))])
                    counts = torch.cat([counts, counts.new_zeros(missing)])
                chosen = unique[counts.topk(self.top_k).indices].expand(len(query), -1)
        pull = (keys[chosen] * query[:, None, :]).sum() / len(query)  # mean over images of the summed cosines
        return self.prompts[chosen], chosen, pull


def gram_schmidt_rows(matrix: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``matrix [N, F]`` with rows ``start:stop`` made new, as CODA-Prompt's ``gram_schmidt`` allocates a task's
    components: each new row is a fresh Gaussian draw ``v`` minus its projections ``(v . u / u . u) u`` onto every
    row ``u`` before it (classical Gram-Schmidt: all projections of the same ``v``), the new rows are then scaled to
    unit norm; rows before ``start`` (past tasks' learned components) are kept, rows from ``stop`` on are zero.

    New rows are orthonormal to each other and to earlier rows that are orthonormal, as they are when allocated;
    learned ones drift, and the new rows are orthogonal to them only approximately, as in their code. Their code
    redraws ``v`` when an earlier row has (near) zero norm, which never ends; here such a row is skipped (its
    projection is zero)."""
    if stop > matrix.shape[1]:
        raise ValueError(f"{stop} components of width {matrix.shape[1]} cannot be orthogonal: lower the pool size")
    rows = torch.zeros_like(matrix)
    rows[:start] = matrix[:start]
    for k in range(start, stop):
        v = torch.randn(matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
        earlier = rows[:k]  # [k, F]
        norms = (earlier * earlier).sum(1)  # [k]
        usable = norms >= 1e-8
        coefficients = (earlier[usable] @ v) / norms[usable]  # [k']
        rows[k] = v - coefficients @ earlier[usable]
    rows[start:stop] = rows[start:stop] / rows[start:stop].norm(dim=1, keepdim=True)
    return rows


class ComponentPool(nn.Module):
    """CODA-Prompt's prompt components for one layer: ``size`` components ``p [L, D]``, each with a key ``K [D]`` and
    an attention vector ``A [D]``; an image's prompt is the sum of the components weighted by
    ``cos(query * A, K)`` (no softmax).

    Components ``[start, stop)`` belong to the task being learned; :meth:`allocate` makes them orthonormal to the
    earlier ones (:func:`gram_schmidt_rows`). In training mode the earlier tasks' components take part in the forward
    without gradient; in evaluation every component up to ``stop`` does.
    """

    def __init__(self, dim: int, size: int, length: int, key_dim: int | None = None) -> None:
        super().__init__()
        key_dim = key_dim or dim
        self.components = nn.Parameter(torch.zeros(size, length, dim))  # [N, L, D]
        self.keys = nn.Parameter(torch.zeros(size, key_dim))  # [N, D_q]
        self.attention = nn.Parameter(torch.zeros(size, key_dim))  # [N, D_q]

    @torch.no_grad()
    def allocate(self, start: int, stop: int) -> None:
        for parameter in (self.components, self.keys, self.attention):
            flat = parameter.data.flatten(1)  # [N, F]
            parameter.data.copy_(gram_schmidt_rows(flat, start, stop).view_as(parameter))

    def _used(self, parameter: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if self.training:
            return torch.cat([parameter[:start].detach(), parameter[start:stop]])
        return parameter[:stop]

    def forward(self, query: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``query [B, D_q]`` -> ``(prompt [B, L, D], weights [B, N_used])``."""
        keys, attention, components = (self._used(p, start, stop) for p in (self.keys, self.attention, self.components))
        attended = query[:, None, :] * attention[None]  # [B, N_used, D_q]
        weights = torch.einsum("bnd,nd->bn", F.normalize(attended, dim=2), F.normalize(keys, dim=1))  # cosines
        return torch.einsum("bn,nld->bld", weights, components), weights

    def orthogonality(self, start: int, stop: int) -> torch.Tensor:
        """CODA-Prompt's penalty ``mean((X X^T - I)^2)`` summed over keys, attention vectors and components in use."""
        total = self.keys.new_zeros(())
        for parameter in (self.keys, self.attention, self.components):
            used = self._used(parameter, start, stop).flatten(1)  # [N_used, F]
            gram = used @ used.T
            total = total + ((gram - torch.eye(len(used), device=gram.device, dtype=gram.dtype)) ** 2).mean()
        return total


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
