"""DualPrompt (methods/dualprompt.py) and CODA-Prompt (methods/coda_prompt.py) against formulas written out here, and
what the three prompt-pool methods (with L2P) share: per-image predictions at test time, resume after a crash."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cil.data import Transformed, build_transform
from cil.engine import Engine
from cil.layers import ComponentPool, gram_schmidt_rows, prefixes_set
from cil.method import create_method
from cil.task import Task
from methods.coda_prompt import coda_cosine
from tests.conftest import TINY_DATA, cpu_trainers, crash_during, empty_tasks, run_engine, tiny_backbone, tiny_stream

TINY = {  # the tiny ViT has 2 blocks
    "l2p": {"pool_size": 4, "length": 1, "top_k": 2, "epochs": 2},
    "dualprompt": {"g_length": 2, "e_length": 3, "g_layers": [0], "e_layers": [1], "pool_size": 5, "epochs": 2},
    "coda_prompt": {"pool_size": 10, "length": 4, "layers": [0, 1], "epochs": 2},
}


def _method(name: str, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    return create_method(name, tiny_backbone(), **{**TINY[name], **kwargs})


def _task(index: int, classes: tuple[int, ...]) -> Task:
    return Task(index=index, name=f"t{index}", classes=classes, class_names=tuple(map(str, classes)), train=[], test=[])  # type: ignore[arg-type]


def _begin(method: Any, *class_counts: int, num_tasks: int = 5) -> None:
    method.num_tasks = num_tasks
    for task in empty_tasks(*class_counts):
        method.begin_task(task)


# ---- DualPrompt -------------------------------------------------------------------------------------------------
def test_dualprompt_trains_with_its_task_s_e_prompt_and_tests_with_the_nearest_key() -> None:
    method = _method("dualprompt")
    _begin(method, 2, 2)  # learning task 1
    images = torch.randn(4, 3, 16, 16)
    g, e = method.g_prompt.detach(), method.e_pool.prompts.detach()  # [1, 2, Lg, D], [P, 1, 2, Le, D]
    with torch.no_grad():
        method.train()
        query = method.query(images)
        with prefixes_set(method.slots, {0: (g[:, 0], g[:, 1]), 1: (e[1:2, 0, 0], e[1:2, 0, 1])}):
            by_hand = method.backbone(images)  # every image with task 1's E-prompt
        torch.testing.assert_close(method.prompted(images)[0], by_hand)
        method.eval()
        nearest = (F.normalize(query, dim=1) @ F.normalize(method.e_pool.keys, dim=1).T).argmax(1)  # [B]
        with prefixes_set(method.slots, {0: (g[:, 0], g[:, 1]), 1: (e[nearest, 0, 0], e[nearest, 0, 1])}):
            by_hand = method.backbone(images)  # each image with its own nearest E-prompt, key and value apart
        torch.testing.assert_close(method.embed(images), by_hand)


def test_dualprompt_pull_term_draws_the_task_s_key_toward_its_queries() -> None:
    method = _method("dualprompt", pull_weight=0.5)
    _begin(method, 2, 2, 2)  # learning task 2
    method.train()
    images = torch.randn(3, 3, 16, 16)
    query = F.normalize(method.query(images), dim=1)
    key = F.normalize(method.e_pool.keys[2], dim=0)
    _, auxiliary = method.prompted(images)
    torch.testing.assert_close(auxiliary, -0.5 * (query @ key).mean())


def test_a_new_task_s_e_prompt_starts_as_the_previous_one_but_not_its_key() -> None:
    method = _method("dualprompt")
    _begin(method, 2)
    with torch.no_grad():
        method.e_pool.prompts[0] += 1.0  # "learned"
    before = method.e_pool.prompts.detach().clone()
    keys = method.e_pool.keys.detach().clone()
    method.begin_task(_task(1, (2, 3)))
    assert torch.equal(method.e_pool.prompts[1], before[0]) and not torch.equal(before[1], before[0])
    assert torch.equal(method.e_pool.prompts[2:], before[2:]) and torch.equal(method.e_pool.keys, keys)
    copying = _method("dualprompt", copy_previous_prompt=False)
    _begin(copying, 2, 2)
    assert not torch.equal(copying.e_pool.prompts[1], copying.e_pool.prompts[0])


def test_dualprompt_learns_its_prompts_keys_and_head_and_leaves_earlier_e_prompts_alone(tmp_path: Path) -> None:
    method = _method("dualprompt", copy_previous_prompt=False)
    backbone = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    ends: list[dict[str, torch.Tensor]] = []
    method.after_task = lambda task, features: ends.append(  # type: ignore[method-assign]
        {k: v.detach().clone() for k, v in method.state_dict().items()}
    )
    run_engine(tmp_path, method, tiny_stream(increment=5, train_per_class=10))
    assert all(torch.equal(v, backbone[k]) for k, v in method.backbone.state_dict().items())  # frozen
    prompts, keys = "e_pool.prompts", "e_pool.keys"
    assert torch.equal(ends[1][prompts][0], ends[0][prompts][0]) and torch.equal(ends[1][keys][0], ends[0][keys][0])
    assert not torch.equal(ends[1][prompts][1], ends[0][prompts][1])  # task 1's own
    assert not torch.equal(ends[1]["g_prompt"], ends[0]["g_prompt"])  # shared by every task
    trainable = {id(p) for p in method.trainable_parameters()}
    assert trainable == {
        id(p) for p in (method.g_prompt, method.e_pool.keys, method.e_pool.prompts, *method.head.parameters())
    }


# ---- CODA-Prompt ------------------------------------------------------------------------------------------------
def test_gram_schmidt_subtracts_from_a_fresh_draw_its_projections_on_every_earlier_row() -> None:
    """CODA-Prompt's allocation: rows before ``start`` kept, new rows orthonormal to them (when they are
    orthonormal) and to each other, rows from ``stop`` on zero; with learned (not orthonormal) earlier rows, the
    classical formula by hand from the same draws."""
    torch.manual_seed(0)
    earlier = torch.linalg.qr(torch.randn(12, 3)).Q.T  # [3, 12], orthonormal rows
    matrix = torch.cat([earlier, torch.randn(6, 12)])
    done = gram_schmidt_rows(matrix, 3, 6)
    assert torch.equal(done[:3], matrix[:3]) and done[6:].abs().sum() == 0
    torch.testing.assert_close(done[:6] @ done[:6].T, torch.eye(6), atol=1e-5, rtol=0)

    learned = torch.randn(9, 12)  # rows 0-2 not orthonormal
    torch.manual_seed(1)
    done = gram_schmidt_rows(learned, 3, 5)
    torch.manual_seed(1)
    rows = [learned[0], learned[1], learned[2]]
    for _ in range(2):
        v = torch.randn(12)
        rows.append(v - sum((v @ u) / (u @ u) * u for u in rows))
    by_hand = torch.stack([r / r.norm() for r in rows[3:]])
    torch.testing.assert_close(done[3:5], by_hand, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="13 components of width 12 cannot be orthogonal"):
        gram_schmidt_rows(matrix, 0, 13)


def test_a_component_prompt_is_the_cosine_weighted_sum_and_earlier_components_get_no_gradient() -> None:
    torch.manual_seed(0)
    pool = ComponentPool(dim=6, size=6, length=2)
    pool.allocate(0, 2)
    with torch.no_grad():  # "learned" during task 0
        for p in pool.parameters():
            p[:2] += 0.1 * torch.randn_like(p[:2])
    pool.allocate(2, 4)
    query = torch.randn(3, 6)
    pool.eval()
    prompt, weights = pool(query, 2, 4)
    for b in range(3):
        for n in range(4):  # evaluation: every component up to the current task's
            cosine = F.cosine_similarity(query[b] * pool.attention[n], pool.keys[n], dim=0)
            torch.testing.assert_close(weights[b, n], cosine)
        torch.testing.assert_close(prompt[b], sum(weights[b, n] * pool.components[n] for n in range(4)))
    pool.train()
    prompt, _ = pool(query, 2, 4)
    prompt.square().sum().backward()
    for p in (pool.components, pool.keys, pool.attention):
        assert p.grad is not None
        assert p.grad[:2].abs().sum() == 0 and p.grad[4:].abs().sum() == 0 and p.grad[2:4].abs().sum() > 0


def test_coda_prompt_gives_each_task_its_components_and_splits_the_prompt_into_key_and_value_prefixes() -> None:
    method = _method("coda_prompt")
    _begin(method, 2, 2, num_tasks=5)  # 10 components, 2 per task: task 1 has [2, 4)
    assert method._span() == (2, 4)
    pool = method.pools[0]
    torch.testing.assert_close(pool.keys[:4] @ pool.keys[:4].T, torch.eye(4), atol=1e-5, rtol=0)
    assert pool.keys[4:].abs().sum() == 0  # later tasks' components are not allocated yet
    images = torch.randn(3, 3, 16, 16)
    method.eval()
    with torch.no_grad():
        query = method.query(images)
        prompts = [p(query, 2, 4)[0] for p in method.pools]  # [B, 4, D] each
        prefixes = {layer: (p[:, :2], p[:, 2:]) for layer, p in zip((0, 1), prompts, strict=True)}
        with prefixes_set(method.slots, prefixes):
            by_hand = method.backbone(images)
        torch.testing.assert_close(method.embed(images), by_hand)


def test_coda_prompt_s_learning_rate_follows_their_cosine_schedule() -> None:
    factor = coda_cosine(20)
    assert factor(0) == factor(1) == 1.0
    assert factor(19) == pytest.approx(math.cos(99 * math.pi * 18 / 3800))  # ~0.097 x lr in the last epoch
    assert factor(10) == pytest.approx(math.cos(99 * math.pi * 9 / 3800))
    assert coda_cosine(1)(0) == 1.0
    method = _method("coda_prompt", epochs=20, lr=0.01)
    _begin(method, 2)
    configured = method.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]
    assert schedule["interval"] == "epoch"
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        schedule["scheduler"].step()
    assert rates == pytest.approx([0.01 * factor(e) for e in range(20)])


def test_coda_prompt_orthogonality_penalty_is_added_when_weighted() -> None:
    method = _method("coda_prompt", ortho_weight=0.5)
    _begin(method, 2, 2)
    with torch.no_grad():
        method.pools[0].keys[2] += 1.0  # no longer orthonormal
    method.train()
    _, penalty = method.prompted(torch.randn(2, 3, 16, 16))
    expected = 0.5 * sum(pool.orthogonality(2, 4) for pool in method.pools)
    torch.testing.assert_close(penalty, expected)
    assert penalty > 0.01
    method.eval()
    assert method.prompted(torch.randn(2, 3, 16, 16))[1] == 0  # training only


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("dualprompt", {"pool_size": 4}, "DualPrompt learns top_k = 1 E-prompts per task and has 4 .*5 tasks"),
        ("coda_prompt", {"pool_size": 4}, "shares its 4 components .* has 5: set pool_size to at least 5"),
        ("coda_prompt", {"pool_size": 40}, "keys are 32-d, too few for 40 orthogonal components"),
    ],
)
def test_a_pool_too_small_for_the_stream_is_refused_before_anything_is_written(
    name: str, kwargs: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        Engine(_method(name, **kwargs), tiny_stream(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("dualprompt", {"g_layers": [1], "e_layers": [1]}, r"blocks \[1\] are in both"),
        ("dualprompt", {"e_layers": [2]}, r"blocks of the ViT \(0 to 1\)"),
        ("coda_prompt", {"length": 3}, "length must be even"),
        ("coda_prompt", {"layers": [0, 0]}, "distinct blocks"),
    ],
)
def test_bad_prompt_options_are_refused(name: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _method(name, **kwargs)


# ---- all three --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TINY))
def test_an_image_s_prediction_does_not_depend_on_the_rest_of_its_test_batch(name: str) -> None:
    """Per-image prompts at test time: an image's logits alone, in its batch and in a shuffled batch are the same."""
    method = _method(name)
    _begin(method, 2, 2, 2)
    with torch.no_grad():  # move the pools off their initial values so that images choose different prompts
        for p in method.trainable_parameters():
            p += 0.3 * torch.randn_like(p)
    method.eval()
    images = torch.randn(12, 3, 16, 16)
    with torch.no_grad():
        alone = torch.cat([method(image[None]) for image in images])  # [12, C]
        together = method(images)
        shuffled = torch.randperm(12)
        mixed = method(images[shuffled])[shuffled.argsort()]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_run_resumed_after_a_crash_gives_the_uninterrupted_run_s_results(name: str, tmp_path: Path) -> None:
    stream = tiny_stream(increment=5, train_per_class=10)

    def engine(out: Path, method: Any, resume: bool = False) -> Engine:
        factory = cpu_trainers(out, enable_checkpointing=False)
        return Engine(method, stream, out, trainer_factory=factory, data=TINY_DATA, seed=5, resume=resume)

    engine(tmp_path / "reference", _method(name)).run()
    with pytest.raises(RuntimeError, match="simulated crash"):
        engine(tmp_path / "crashed", crash_during(_method(name), 1)).run()
    engine(tmp_path / "crashed", _method(name), resume=True).run()
    reference, resumed = (pd.read_csv(tmp_path / run / "results.csv") for run in ("reference", "crashed"))
    pd.testing.assert_frame_equal(resumed, reference)


def test_dualprompt_records_how_often_the_keys_find_the_image_s_task(tmp_path: Path) -> None:
    """tasks.csv e_prompt_task_acc: the share of test images (of every seen task) whose chosen E-prompt is their
    own task's, recomputed here from the final keys for the last task's evaluation. Test-time selection is among all
    the pool's keys, also those of tasks not trained yet, as in the authors' code."""
    method = _method("dualprompt", pull_weight=50.0, lr=0.05)  # keys that move in a few steps
    stream = tiny_stream(base=6, increment=4, train_per_class=10)  # unequal tasks: 60 % is not 40 %
    run_engine(tmp_path, method, stream)
    recorded = pd.read_csv(tmp_path / "tasks.csv")["e_prompt_task_acc"].tolist()
    method.eval()
    right = total = 0
    transform = build_transform(16, method.backbone.mean, method.backbone.std, train=False)
    with torch.no_grad():
        for task in stream:
            images = torch.stack([image for image, _ in Transformed(task.test, transform)])  # type: ignore[misc]
            chosen = method.e_pool.select(method.query(images))[1][:, 0]
            right += int((chosen == task.index).sum())
            total += len(images)
    assert recorded[1] == pytest.approx(100.0 * right / total, abs=1e-3)
    assert 0 < recorded[1] < 100


def test_each_prompt_method_starts_its_head_rows_as_its_authors_do() -> None:
    """L2P and DualPrompt: timm's ViT head (std 0.02, zero bias); CODA-Prompt: PyTorch's nn.Linear (U(+-1/sqrt(D)))."""
    for name, timm_head in (("l2p", True), ("dualprompt", True), ("coda_prompt", False)):
        method = _method(name)
        _begin(method, 5)
        bias, weight = method.head.bias.detach(), method.head.weight.detach()
        assert (bias.abs().sum() == 0) == timm_head, name
        assert weight.abs().max() <= 1 / 32**0.5 and (weight.std() < 0.03) == timm_head, name
