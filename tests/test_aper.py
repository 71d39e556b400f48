"""APER: every variant adapts its copy of the PTM on the first task, then freezes it, and classifies by prototypes of
the concatenated ``[PTM features | adapted features]`` (the authors' ``MultiBranchCosineIncrementalNet``: the PTM is
``backbones[0]``, the adapted model ``backbones[1]``, features ``torch.cat`` along dimension 1)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from cil.engine import Engine
from cil.method import create_method
from cil.task import Task
from methods.aper import APER
from tests.conftest import TINY_DATA, cpu_trainers, tiny_backbone, tiny_stream

VARIANTS = ["aper_adapter", "aper_vpt_shallow", "aper_vpt_deep", "aper_ssf", "aper_finetune"]


@torch.no_grad()
def _adapted(method: APER, x: torch.Tensor) -> torch.Tensor:
    with method.evaluating():
        return method.adapted(x)  # [B, D]


@pytest.mark.parametrize("name", VARIANTS)
def test_aper_adapts_on_the_first_task_only_and_concatenates_ptm_and_adapted_features(
    name: str, tmp_path: Path
) -> None:
    stream = tiny_stream(increment=4, train_per_class=8, test_per_class=2)  # tasks of 4, 4 and 2 classes
    torch.manual_seed(0)
    method = create_method(name, tiny_backbone(), epochs=2)
    assert isinstance(method, APER)
    engine = Engine(
        method, stream, tmp_path, trainer_factory=cpu_trainers(tmp_path), data=TINY_DATA, seed=1, count_flops=False
    )
    x = torch.stack([engine.eval_transform(image) for image, _ in stream[0].test])  # [B, 3, H, W]
    ptm = copy.deepcopy(method.backbone).eval()  # the PTM as it was given
    with torch.no_grad():
        ptm_features = ptm(x)  # [B, D]
    untrained = _adapted(method, x)
    after: list[torch.Tensor] = []  # the adapted branch's embedding of x after each task
    original = method.after_task

    def record(task: Task, features: Any) -> None:
        original(task, features)
        after.append(_adapted(method, x))

    method.after_task = record  # type: ignore[method-assign]
    engine.run()
    assert len(after) == len(stream) == 3

    # (a) the first task adapted the copy: its embedding moved away from where it started and from the PTM's
    moved, apart = (float((after[0] - reference).abs().max()) for reference in (untrained, ptm_features))
    assert moved > 1e-4, f"{name}: adaptation did not change the adapted embedding (max change {moved:.2g})"
    assert apart > 1e-4, f"{name}: the adapted embedding is the PTM's (max difference {apart:.2g})"
    # (b) then it is frozen: bit-identical after every later task, and nothing in it can train
    for task, embedding in enumerate(after[1:], start=1):
        assert torch.equal(embedding, after[0]), f"{name}: the adapted embedding changed in task {task}"
    assert not any(p.requires_grad for p in method.adapted.parameters())
    # (c) the PTM is untouched, and the embedding is [PTM | adapted], prototypes included
    for key, value in ptm.state_dict().items():
        assert torch.equal(method.backbone.state_dict()[key], value), f"{name}: the PTM's {key} changed"
    with torch.no_grad(), method.evaluating():
        torch.testing.assert_close(method.embed(x), torch.cat([ptm_features, after[0]], dim=1), rtol=0, atol=0)
    last = stream[-1]
    images = torch.stack([engine.eval_transform(image) for image, _ in last.train])
    labels = torch.as_tensor([label for _, label in last.train])
    with torch.no_grad():
        expected = torch.cat([ptm(images), _adapted(method, images)], dim=1)  # [N, 2D]
    for c in last.classes:
        torch.testing.assert_close(method.head.prototypes[c], expected[labels == c].mean(0))


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_aper_cosine_schedule_steps_per_epoch_as_the_authors_or_per_step(interval: str, tmp_path: Path) -> None:
    """The authors' ``CosineAnnealingLR(T_max=tuned_epoch)`` is stepped once per epoch: over 3 epochs of 3 batches
    the learning rate is lr, lr, lr, then 0.75 lr three times, then 0.25 lr (cosine to 0 over 3 periods)."""
    stream = tiny_stream(increment=4, train_per_class=24, test_per_class=2)  # task 0: 96 images, 3 batches of 32
    method = create_method("aper_ssf", tiny_backbone(), epochs=3, lr=0.1, lr_interval=interval)
    rates: list[float] = []
    original = method.training_step

    def record(batch: Any, batch_idx: int) -> torch.Tensor:
        rates.append(method.trainer.optimizers[0].param_groups[0]["lr"])
        return original(batch, batch_idx)

    method.training_step = record  # type: ignore[method-assign]
    engine = Engine(
        method, stream, tmp_path, trainer_factory=cpu_trainers(tmp_path), data=TINY_DATA, seed=1, count_flops=False
    )
    engine.run()
    if interval == "epoch":
        expected = [0.1] * 3 + [0.075] * 3 + [0.025] * 3
    else:  # cosine over 9 steps
        expected = [0.05 * (1 + math.cos(math.pi * step / 9)) for step in range(9)]
    assert rates == pytest.approx(expected)


def test_aper_refuses_an_unknown_schedule_interval() -> None:
    with pytest.raises(ValueError, match="lr_interval"):
        create_method("aper_adapter", tiny_backbone(), lr_interval="batch")
