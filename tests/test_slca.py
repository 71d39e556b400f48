"""SLCA: slow backbone / fast head, frozen earlier heads, alignment of a copy with normalised logits, shrunk means."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from methods.slca import SLCA
from tests.conftest import empty_tasks, tiny_backbone


def _slca(**kwargs: Any) -> SLCA:
    torch.manual_seed(0)
    return SLCA(tiny_backbone(), **{"align_epochs": 5, "align_samples_per_class": 64, **kwargs})


def _separated(
    classes: range, dim: int, per_class: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.tensor(list(classes)).repeat_interleave(per_class)
    centres = 3.0 * torch.randn(max(classes) + 1, dim, generator=torch.Generator().manual_seed(7))
    return centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=generator), labels


def test_the_backbone_learns_at_a_hundredth_of_the_new_head_and_earlier_heads_are_frozen() -> None:
    method = _slca(lr=0.02)
    tasks = empty_tasks(2, 3)
    for task in tasks:
        method.begin_task(task)
    old, new = method.head.linears()
    assert not any(p.requires_grad for p in old.parameters())
    assert all(p.requires_grad for p in new.parameters())
    optimizer = method.configure_optimizers()["optimizer"]
    backbone_group, head_group = optimizer.param_groups
    assert backbone_group["lr"] == pytest.approx(0.0002) and head_group["lr"] == 0.02
    assert {id(p) for p in head_group["params"]} == {id(p) for p in new.parameters()}
    assert len(backbone_group["params"]) == len(list(method.backbone.parameters()))
    assert not any(p.requires_grad for p in method.aligned.parameters())  # only alignment trains the copy


def test_the_learning_rate_drops_tenfold_after_each_milestone_epoch() -> None:
    method = _slca(milestones=[2])
    method.begin_task(empty_tasks(2)[0])
    schedule = method.configure_optimizers()
    optimizer, scheduler = schedule["optimizer"], schedule["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[1]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.01, 0.01, 0.001, 0.001])


def test_alignment_trains_a_copy_and_leaves_the_trained_heads_for_the_next_task() -> None:
    method = _slca(align_epochs=10)
    tasks = empty_tasks(2, 2)
    generator = torch.Generator().manual_seed(0)
    dim = method.backbone.num_features
    for task in tasks:
        method.begin_task(task)
        z, y = _separated(range(task.classes[0], task.classes[-1] + 1), dim, 40, generator)
        before = [p.clone() for p in method.head.parameters()]
        method.after_task(task, lambda _data, z=z, y=y: (z, y))
        assert all(torch.equal(a, b) for a, b in zip(before, method.head.parameters(), strict=True))
    trained = torch.cat([p.flatten() for p in method.head.parameters()])
    aligned = torch.cat([p.flatten() for p in method.aligned.parameters()])
    assert not torch.allclose(trained, aligned)
    fresh, labels = _separated(range(4), dim, 30, generator)
    assert (method.classify(fresh).argmax(1) == labels).float().mean() > 0.95  # the aligned copy scores
    assert "align_final_loss" in method.task_info


def test_logit_norm_loss_and_shrunk_means_are_the_authors_formulas() -> None:
    method = _slca()
    for task in empty_tasks(2, 3, 1):
        method.begin_task(task)
    logits, targets = torch.randn(4, 6), torch.tensor([0, 3, 5, 2])
    parts = [logits[:, :2], logits[:, 2:5], logits[:, 5:]]
    norms = torch.stack([p.norm(dim=1) + 1e-7 for p in parts]).mean(0)
    expected = F.cross_entropy(logits / norms[:, None] / 0.1, targets)
    torch.testing.assert_close(method._alignment_loss(logits, targets), expected)
    # task t_c of class c in task 2 of 3: 0.9 + 0.1 (t_c + 1) / 3
    scale = method._mean_scale()
    torch.testing.assert_close(
        scale, torch.tensor([0.9 + 0.1 / 3] * 2 + [0.9 + 0.2 / 3] * 3 + [1.0], dtype=torch.float64)
    )


def test_the_final_norm_is_reset_as_in_the_authors_code_unless_asked_to_keep_it() -> None:
    torch.manual_seed(0)
    backbone = tiny_backbone()
    with torch.no_grad():
        backbone.model.norm.weight.fill_(2.0)
    kept = SLCA(backbone, final_norm="pretrained")
    assert torch.all(kept.backbone.model.norm.weight == 2.0)
    reset = SLCA(tiny_backbone(), final_norm="reset")
    assert torch.all(reset.backbone.model.norm.weight == 1.0) and torch.all(reset.backbone.model.norm.bias == 0.0)
    with pytest.raises(ValueError, match="final_norm"):
        SLCA(tiny_backbone(), final_norm="fresh")
