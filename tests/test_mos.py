"""MOS: adapter merging, Gaussian statistics and classifier alignment, self-refined retrieval, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

from cil.engine import Engine
from cil.task import Task
from methods.mos import MOS
from tests.conftest import TINY_DATA, cpu_trainers, crash_during, tiny_backbone, tiny_stream


def _mos(**kwargs: Any) -> MOS:
    torch.manual_seed(0)
    return MOS(tiny_backbone(), **{"epochs": 3, "lr": 0.05, "align_epochs": 5, "align_samples_per_class": 32, **kwargs})


def _grow(method: MOS, *class_counts: int) -> None:
    first = 0
    for index, count in enumerate(class_counts):
        classes = tuple(range(first, first + count))
        names = tuple(map(str, classes))
        method.grow(Task(index=index, name=f"t{index}", classes=classes, class_names=names, train=[], test=[]))  # type: ignore[arg-type]
        first += count


def test_merge_pulls_the_running_adapter_toward_the_mean_of_earlier_ones() -> None:
    method = _mos(merge_momentum=0.1)
    _grow(method, 2, 2, 2)  # now in task 2
    width = method.adapter_bank.shape[1]
    method.adapter_bank[0] = 1.0
    method.adapter_bank[1] = 3.0  # mean of tasks 0 and 1: 2.0
    params = method.adapter.parameters()
    for param in params:
        param.data.fill_(10.0)
    method._merge_toward_previous()
    for param in params:
        torch.testing.assert_close(param.data, torch.full_like(param, 0.9 * 10.0 + 0.1 * 2.0))
    assert sum(p.numel() for p in params) == width
    method._merge_toward_previous()  # a second step: 0.9 * 9.2 + 0.1 * 2
    torch.testing.assert_close(params[0].data, torch.full_like(params[0], 0.9 * 9.2 + 0.2))


def test_gaussians_and_alignment_recover_separated_classes() -> None:
    method = _mos(align_epochs=20, align_samples_per_class=64)
    _grow(method, 2, 2)
    dim = method.class_means.shape[1]
    generator = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.randn(4, dim, generator=generator)  # [4, D]
    labels = torch.arange(4).repeat_interleave(50)  # [200]
    features = centres[labels] + 0.5 * torch.randn(200, dim, generator=generator)
    method._store_gaussians(features, labels, [0, 1, 2, 3])
    torch.testing.assert_close(method.class_means, features.view(4, 50, dim).mean(1))
    expected = torch.cov(features[:50].T.double()).float() + 1e-4 * torch.eye(dim)
    torch.testing.assert_close(method.class_covs[0], expected, atol=1e-5, rtol=1e-4)
    method._align_classifier()
    fresh = centres[labels] + 0.5 * torch.randn(200, dim, generator=generator)
    accuracy = (method.head(fresh).argmax(1) == labels).float().mean()
    assert accuracy > 0.95
    assert method.task_info["align_final_loss"] < 0.5


class _TaskHead(nn.Module):
    """Logits that depend on which adapter made the features: adapter 0 votes class 2, adapter 1 votes class 3."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        votes = torch.where(z[:, :1] == 0, torch.tensor([0.0, 0, 5, 0]), torch.tensor([0.0, 0, 1, 5]))
        return votes  # [B, 4]


@pytest.mark.parametrize(("max_refine", "task", "winner"), [(1, 0, 2), (2, 1, 3), (4, 1, 3)])
def test_self_refined_retrieval_follows_the_predicted_task(max_refine: int, task: int, winner: int) -> None:
    method = _mos(max_refine=max_refine)
    _grow(method, 2, 2)  # classes 0, 1 in task 0; 2, 3 in task 1
    method.adapter_bank[0], method.adapter_bank[1] = 0.0, 1.0
    method._embed_with = lambda x, adapter: adapter[:1].expand(len(x), 8)  # type: ignore[method-assign]
    method.head = _TaskHead()
    logits, used = method._self_refine(torch.zeros(3, 3, 16, 16), torch.zeros(3, dtype=torch.long))
    assert used.tolist() == [task] * 3  # first guess task 0; its head votes a task-1 class; task 1's agrees
    assert logits.argmax(1).tolist() == [winner] * 3


def _run(out: Path, method: MOS, stream_seed: int = 0, **engine: Any) -> Engine:
    stream = tiny_stream(seed=stream_seed, increment=2, train_per_class=30)  # 5 tasks of 2 classes
    return Engine(method, stream, out, trainer_factory=cpu_trainers(out), seed=1, data=TINY_DATA, **engine)


def test_mos_keeps_task_adapters_and_reports_retrieval(tmp_path: Path) -> None:
    method = _mos()
    engine = _run(tmp_path, method)
    engine.run()
    bank = method.adapter_bank.clone()
    assert bank.shape[0] == 5 and all(not torch.equal(bank[i], bank[i + 1]) for i in range(4))
    engine._evaluate(engine.features.trainer, engine.stream[-1], engine.stream.tasks)  # type: ignore[arg-type]
    torch.testing.assert_close(method.adapter_bank, bank)  # evaluation never rewrites stored adapters
    tasks = pd.read_csv(tmp_path / "tasks.csv")
    assert tasks["retrieval_acc"].between(0, 100).all() and tasks.loc[0, "retrieval_acc"] == 100.0  # one task
    assert tasks["align_final_loss"].isna().iloc[0] and tasks["align_final_loss"].notna().iloc[1:].all()


def test_resume_after_task_k_gives_the_uninterrupted_results(tmp_path: Path) -> None:
    _run(tmp_path / "reference", _mos()).run()
    crashing = crash_during(_mos(), 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "crashed", crashing).run()
    _run(tmp_path / "crashed", _mos(), resume=True).run()
    reference, resumed = (pd.read_csv(tmp_path / name / "results.csv") for name in ("reference", "crashed"))
    pd.testing.assert_frame_equal(resumed, reference)


@pytest.mark.parametrize(
    "bad", [{"covariance": "low_rank"}, {"prototype_adapter": "last"}, {"max_refine": 0}, {"merge_momentum": 2.0}]
)
def test_bad_options_say_what_is_allowed(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        MOS(tiny_backbone(), **bad)
