"""EASE: a fresh adapter per task kept as a subspace, concatenated features, prototype completion and the subspace
weighting of the scores, each against the authors' formula written out here."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from cil.layers import Adapter
from cil.task import Task
from methods.ease import EASE
from tests.conftest import empty_tasks, tiny_backbone


def _ease(**kwargs: Any) -> EASE:
    torch.manual_seed(0)
    return EASE(tiny_backbone(), **kwargs)


def _adapters(method: EASE) -> list[Adapter]:
    return [m for m in method.backbone.modules() if isinstance(m, Adapter)]


def test_every_task_trains_a_fresh_adapter_and_the_finished_ones_stay_as_subspaces() -> None:
    method = _ease()
    first, second = empty_tasks(2, 2)
    method.begin_task(first)
    with torch.no_grad():
        for adapter in _adapters(method):
            adapter.up.weight.fill_(0.5)  # "trained"
    trained = method.adapter.vector()
    method.after_task(first, lambda _data: (torch.randn(4, 32), torch.tensor([0, 0, 1, 1])))
    method.begin_task(second)
    torch.testing.assert_close(method.adapter_bank[0], trained)
    assert all(torch.equal(a.up.weight, torch.zeros_like(a.up.weight)) for a in _adapters(method))  # adds zeros
    assert not torch.equal(method.adapter.vector(), trained)
    assert method.train_head is not None and method.train_head.weight.shape == (2, 32)  # the new task's classes


def test_the_feature_is_the_class_token_under_every_subspace_concatenated() -> None:
    method = _ease()
    for task in empty_tasks(2, 2):
        method.grow(task)
    method.adapter_bank.normal_(0, 0.05)
    x = torch.randn(3, 3, 16, 16)
    method.eval()
    with torch.no_grad():
        z = method.embed(x)
        expected = torch.cat([method.adapter.run_with(method.adapter_bank[j], x) for j in range(2)], dim=-1)
    assert z.shape == (3, 64)
    torch.testing.assert_close(z, expected)
    assert not torch.allclose(z[:, :32], z[:, 32:])  # two different adapters


def test_new_prototypes_are_class_means_in_every_subspace_and_old_ones_are_completed() -> None:
    method = _ease()
    tasks = empty_tasks(2, 3)
    generator = torch.Generator().manual_seed(0)
    per_subspace = {j: torch.randn(10, 32, generator=generator) for j in range(2)}  # what each subspace "sees"

    def features(task: Task) -> Any:
        labels = torch.tensor(task.classes).repeat_interleave(2)
        rows = slice(0, len(labels)) if task.index == 0 else slice(4, 4 + len(labels))
        return lambda _data: (per_subspace[method._subspace][rows], labels)  # type: ignore[index]

    for task in tasks:
        method.begin_task(task)
        method.after_task(task, features(task))
    for c in range(2, 5):  # task 1's classes: real in subspaces 0 and 1
        for j in range(2):
            rows = per_subspace[j][4 + 2 * (c - 2) : 4 + 2 * (c - 1)]
            torch.testing.assert_close(method.prototypes[c, j], rows.mean(0))
    for c in range(2):  # task 0's classes: real in subspace 0, completed in subspace 1
        torch.testing.assert_close(method.prototypes[c, 0], per_subspace[0][2 * c : 2 * c + 2].mean(0))
        cosines = [F.cosine_similarity(method.prototypes[c, 0], method.prototypes[j, 0], dim=0) for j in range(2, 5)]
        weights = [math.exp(v) for v in cosines]
        expected = sum(w / sum(weights) * method.prototypes[j, 1] for w, j in zip(weights, range(2, 5), strict=True))
        torch.testing.assert_close(method.prototypes[c, 1], expected)


def test_completion_over_three_tasks_takes_donors_from_every_task_from_the_newer_subspace_on() -> None:
    method = _ease()
    for task in empty_tasks(1, 1, 1):
        method.grow(task)
    method.prototypes.normal_()
    real = method.prototypes.clone()
    method._complete_prototypes()
    # class 0 (task 0) in subspace 2: donors are classes of tasks >= 2, i.e. class 2 only
    torch.testing.assert_close(method.prototypes[0, 2], real[2, 2])
    # class 0 in subspace 1: donors classes 1 and 2, weighted by cosine in subspace 0
    w = torch.stack([F.cosine_similarity(real[0, 0], real[j, 0], dim=0) for j in (1, 2)]).softmax(0)
    torch.testing.assert_close(method.prototypes[0, 1], w[0] * real[1, 1] + w[1] * real[2, 1])
    torch.testing.assert_close(method.prototypes[1, 2], real[2, 2])  # class 1 (task 1) in subspace 2
    torch.testing.assert_close(method.prototypes[2], real[2])  # the newest task's class: all real


def test_a_class_scores_its_own_subspace_fully_and_the_others_at_alpha_over_t() -> None:
    method = _ease(alpha=0.3)
    for task in empty_tasks(1, 2, 1):
        method.grow(task)
    method.prototypes.normal_()
    z = torch.randn(2, 3 * 32)
    scores = method.classify(z)
    blocks = z.view(2, 3, 32)
    owner = [0, 1, 1, 2]
    for b in range(2):
        for c in range(4):
            cos = [F.cosine_similarity(blocks[b, j], method.prototypes[c, j], dim=0) for j in range(3)]
            expected = cos[owner[c]] + 0.3 / 2 * sum(cos[j] for j in range(3) if j != owner[c])
            torch.testing.assert_close(scores[b, c], expected, atol=1e-5, rtol=1e-5)
