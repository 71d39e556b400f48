"""L2P (methods/l2p.py) and its prompt pool (cil/layers/_prompt_pool.py): selection per image, the key-matching term
and the prompted forward against formulas written out here, and what trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cil.layers import PromptPool, prompted_tokens
from cil.method import create_method
from tests.conftest import run_engine, tiny_backbone, tiny_stream


def test_each_image_chooses_the_prompts_nearest_its_query_and_the_pull_term_sums_their_cosines() -> None:
    torch.manual_seed(0)
    pool = PromptPool(dim=8, pool_size=6, length=2, top_k=3)
    query = torch.randn(4, 8)
    tokens, chosen, pull = pool.select(query)
    expected_pull = torch.tensor(0.0)
    for b in range(4):
        cosines = torch.stack([F.cosine_similarity(query[b], key, dim=0) for key in pool.keys])  # [P]
        nearest = cosines.argsort(descending=True)[:3]
        assert chosen[b].tolist() == nearest.tolist()
        assert torch.equal(tokens[b], torch.stack([pool.prompts[i] for i in nearest]))  # [k, L, D], in that order
        expected_pull = expected_pull + cosines[nearest].sum()
    torch.testing.assert_close(pull, expected_pull / 4)


def test_the_prompted_forward_is_the_vit_with_prompt_tokens_after_the_class_token() -> None:
    torch.manual_seed(0)
    vit = tiny_backbone().model.eval()
    images, prompts = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32)
    patches = vit.patch_embed(images) + vit.pos_embed[:, 1:]  # [B, N, D]
    cls = vit.cls_token.expand(2, -1, -1) + vit.pos_embed[:, :1]
    by_hand = torch.cat([cls, prompts + vit.pos_embed[:, :1], patches], dim=1)  # L2P: prompts at the class position
    with torch.no_grad():
        torch.testing.assert_close(prompted_tokens(vit, images, prompts), vit.norm(vit.blocks(by_hand)))
        no_prompt = prompted_tokens(vit, images, prompts[:, :0])
        torch.testing.assert_close(no_prompt, vit.forward_features(images))


def test_batchwise_selection_lets_the_batch_vote_and_is_off_by_default() -> None:
    torch.manual_seed(0)
    pool = PromptPool(dim=8, pool_size=4, length=1, top_k=1)
    assert not pool.batchwise and not create_method("l2p", tiny_backbone()).pool.batchwise
    queries = pool.keys.detach()[[0, 0, 1]]  # each query is a key: its own prompt is the nearest
    assert pool.select(queries)[1].flatten().tolist() == [0, 0, 1]
    pool.batchwise = True
    assert pool.select(queries)[1].flatten().tolist() == [0, 0, 0]  # the third image gets the majority's prompt
    assert pool.select(queries[2:])[1].flatten().tolist() == [1]  # ... which it would not get alone


def test_l2p_trains_prompts_keys_and_the_current_classes_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    method = create_method("l2p", tiny_backbone(), epochs=1)
    backbone = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    keys, prompts = method.pool.keys.detach().clone(), method.pool.prompts.detach().clone()
    stream = tiny_stream(increment=5, train_per_class=10)
    heads = []
    method.after_task = lambda task, features: heads.append(method.head.weight.detach().clone())  # type: ignore[method-assign]
    run_engine(tmp_path, method, stream)
    assert all(torch.equal(v, backbone[k]) for k, v in method.backbone.state_dict().items())  # frozen
    assert not torch.equal(method.pool.keys, keys) and not torch.equal(method.pool.prompts, prompts)
    torch.testing.assert_close(heads[1][:5], heads[0])  # task 0's rows: masked out of task 1's loss, untouched
    trainable = {id(p) for p in method.trainable_parameters()}
    assert trainable == {id(p) for p in (method.pool.keys, method.pool.prompts, *method.head.parameters())}


def test_l2p_refuses_a_backbone_that_is_not_a_vit() -> None:
    with pytest.raises(ValueError, match="L2P prompts a timm Vision Transformer"):
        create_method("l2p", __import__("cil").Backbone(name="resnet18"))
