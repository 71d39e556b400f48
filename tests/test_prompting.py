"""The machinery the prompt-pool methods share: per-image prefix slots (cil/layers/_prompt.py) and the query cache
(cil/prompting.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cil.layers import PrefixAttention, inject_prefix_slots, prefixes_set
from cil.method import create_method
from cil.prompting import QueryCache
from tests.conftest import tiny_backbone


def test_a_slot_is_the_plain_attention_until_given_prefixes_and_again_after() -> None:
    torch.manual_seed(0)
    vit: Any = tiny_backbone().model.eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        plain = vit.forward_features(images)
        slots = inject_prefix_slots(vit, [0, 1])
        torch.testing.assert_close(vit.forward_features(images), plain, rtol=0, atol=0)
        prefix = (torch.randn(3, 2, 32), torch.randn(3, 2, 32))
        with pytest.raises(RuntimeError, match="boom"), prefixes_set(slots, {1: prefix}):
            assert not torch.equal(vit.forward_features(images), plain)
            raise RuntimeError("boom")
        assert all(slot.prefix is None for slot in slots.values())  # taken back on error too
        torch.testing.assert_close(vit.forward_features(images), plain, rtol=0, atol=0)
    with pytest.raises(KeyError, match=r"blocks \[5\] have no prefix slot"), prefixes_set(slots, {5: prefix}):
        pass


def test_each_image_gets_its_own_prefixes() -> None:
    """Image b with prefixes (K_b, V_b) through a slot == image b alone through a PrefixAttention whose learned
    prefixes are (K_b, V_b)."""
    torch.manual_seed(0)
    vit: Any = tiny_backbone().model.eval()
    base = vit.blocks[0].attn
    tokens = torch.randn(3, 5, 32)  # [B, N, D]
    keys, values = torch.randn(3, 4, 32), torch.randn(3, 4, 32)  # [B, P, D]
    slots = inject_prefix_slots(vit, [0])
    with torch.no_grad(), prefixes_set(slots, {0: (keys, values)}):
        together = slots[0](tokens)
    for b in range(3):
        single = PrefixAttention(base, length=4).eval()
        with torch.no_grad():
            single.prefix_key.copy_(keys[b])
            single.prefix_value.copy_(values[b])
            torch.testing.assert_close(together[b], single(tokens[b : b + 1])[0])
        by_hand = _attention_by_hand(base, tokens[b], keys[b], values[b])
        torch.testing.assert_close(together[b], by_hand, rtol=1e-5, atol=1e-5)


def _attention_by_hand(attn: Any, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q [k_p; k]^T / sqrt(d)) [v_p; v] per head, then the output projection (x [N, D], prefixes [P, D])."""
    heads, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).chunk(3, dim=-1)  # each [N, D]
    k, v = torch.cat([key, k]), torch.cat([value, v])  # [P + N, D]
    out = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[:, cols] @ k[:, cols].T / d**0.5, dim=-1)  # [N, P + N]
        out.append(weights @ v[:, cols])
    return attn.proj(torch.cat(out, dim=-1))


def test_the_query_cache_answers_an_image_it_has_seen_without_a_forward() -> None:
    cache = QueryCache("always")
    calls: list[int] = []

    def compute(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return images.flatten(1).sum(1, keepdim=True) * torch.ones(1, 4)  # [M, 4]

    images = torch.randn(5, 3, 4, 4)
    first = cache(images, compute)
    again = cache(images[[4, 0, 2]], compute)
    mixed = cache(torch.cat([images[:2], images[:2] + 1.0]), compute)
    assert calls == [5, 2]  # the second batch entirely from the cache, the third only the two new images
    torch.testing.assert_close(again, first[[4, 0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(mixed, compute(torch.cat([images[:2], images[:2] + 1.0])), rtol=0, atol=0)
    assert (cache.hits, cache.misses) == (5, 7)
    assert not QueryCache("auto").active(torch.zeros(1, device="meta")) and QueryCache("auto").active(images)
    with pytest.raises(ValueError, match="cache_queries must be one of"):
        QueryCache("sometimes")


def test_a_prompt_method_caches_evaluation_queries_only_and_they_equal_the_uncached_ones() -> None:
    torch.manual_seed(0)
    method = create_method("l2p", tiny_backbone(), pool_size=4, length=1, top_k=2)
    method.head.expand(3)
    images = torch.randn(4, 3, 16, 16)
    method.train()
    method(images)
    assert method.queries.misses == 0  # training batches are augmented: never cached
    method.eval()
    with torch.no_grad():
        first, second = method(images), method(images)
        method.queries.mode = "never"
        uncached = method(images)
    assert (method.queries.hits, method.queries.misses) == (4, 4)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(uncached, first, rtol=0, atol=0)
