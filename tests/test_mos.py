"""MOS: adapter merging, Gaussian statistics and classifier alignment, self-refined retrieval, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

from cil.data import Transformed
from cil.engine import Engine
from cil.task import Task
from methods.mos import MOS
from tests.conftest import TINY_DATA, cpu_trainers, crash_during, empty_tasks, tiny_backbone, tiny_stream


def _mos(**kwargs: Any) -> MOS:
    torch.manual_seed(0)
    return MOS(tiny_backbone(), **{"epochs": 3, "lr": 0.05, "align_epochs": 5, "align_samples_per_class": 32, **kwargs})


def _grow(method: MOS, *class_counts: int) -> None:
    for task in empty_tasks(*class_counts):
        method.grow(task)


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
    dim = method.gaussians.means.shape[1]
    generator = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.randn(4, dim, generator=generator)  # [4, D]
    labels = torch.arange(4).repeat_interleave(50)  # [200]
    features = centres[labels] + 0.5 * torch.randn(200, dim, generator=generator)
    method.gaussians.fit(features, labels, [0, 1, 2, 3])
    torch.testing.assert_close(method.gaussians.means, features.view(4, 50, dim).mean(1))
    expected = torch.cov(features[:50].T.double()).float() + 1e-4 * torch.eye(dim)
    torch.testing.assert_close(method.gaussians.covs[0], expected, atol=1e-5, rtol=1e-4)
    method._align_classifier()
    fresh = centres[labels] + 0.5 * torch.randn(200, dim, generator=generator)
    accuracy = (method.head(fresh).argmax(1) == labels).float().mean()
    assert accuracy > 0.95
    assert method.task_info["align_final_loss"] < 0.5


def test_checkpoints_from_before_the_shared_gaussians_still_load() -> None:
    """Runs saved when MOS kept its own ``class_means`` / ``class_covs`` buffers resume into ``gaussians``."""
    method = _mos()
    tasks = empty_tasks(2, 2)
    for task in tasks:
        method.grow(task)
    method.gaussians.means.normal_()
    method.gaussians.covs.normal_()
    state = method.cil_state()
    old_names = {"gaussians.means": "class_means", "gaussians.covs": "class_covs"}
    state["weights"] = {old_names.get(k, k): v for k, v in state["weights"].items()}
    restored = _mos()
    restored.load_cil_state(state, tasks)
    torch.testing.assert_close(restored.gaussians.means, method.gaussians.means)
    torch.testing.assert_close(restored.gaussians.covs, method.gaussians.covs)


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
    engine._evaluate(engine.features.trainer, len(engine.stream) - 1, engine.stream.tasks)  # type: ignore[arg-type]
    torch.testing.assert_close(method.adapter_bank, bank)  # evaluation never rewrites stored adapters
    tasks = pd.read_csv(tmp_path / "tasks.csv")
    # the recorded retrieval accuracy after the last task is the share of test images whose retrieved adapter is
    # their own task's, recomputed here from the method's own predictions over every seen task's test images
    images, labels = _test_set(engine)
    method.eval()
    with torch.no_grad():
        _, retrieved, first_guess = method._predict(images)
    true_task = method.class_task[labels]
    assert tasks["retrieval_acc"].iloc[-1] == pytest.approx(
        100.0 * (retrieved == true_task).float().mean().item(), abs=1e-3
    )
    assert tasks["first_guess_task_acc"].iloc[-1] == pytest.approx(
        100.0 * (first_guess == true_task).float().mean().item(), abs=1e-3
    )
    assert tasks["align_final_loss"].isna().iloc[0] and tasks["align_final_loss"].notna().iloc[1:].all()


def _test_set(engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
    """Every task's test images under the evaluation transform ``[N, 3, H, W]`` and their labels ``[N]``."""
    pairs = [Transformed(task.test, engine.eval_transform)[i] for task in engine.stream for i in range(len(task.test))]
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])


def test_resume_after_task_k_gives_the_uninterrupted_results(tmp_path: Path) -> None:
    _run(tmp_path / "reference", _mos()).run()
    crashing = crash_during(_mos(), 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "crashed", crashing).run()
    _run(tmp_path / "crashed", _mos(), resume=True).run()
    reference, resumed = (pd.read_csv(tmp_path / name / "results.csv") for name in ("reference", "crashed"))
    pd.testing.assert_frame_equal(resumed, reference)


@pytest.mark.parametrize(
    "bad",
    [
        {"covariance": "low_rank"},
        {"prototype_adapter": "last"},
        {"max_refine": 0},
        {"merge_momentum": 2.0},
        {"statistics_adapter": "running"},
        {"head_init": "zeros"},
    ],
)
def test_bad_options_say_what_is_allowed(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        MOS(tiny_backbone(), **bad)


class _Images(torch.utils.data.Dataset):
    """Images with their labels stored as ``targets`` (read without touching an image)."""

    def __init__(self, images: torch.Tensor, labels: list[int]) -> None:
        self.images, self.targets = images, labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.targets[i]


def _features_in_batches_of(method: MOS, size: int) -> Any:
    def features(dataset: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        batches = list(torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=False))
        with torch.no_grad():
            return torch.cat([method.embed(x) for x, _ in batches]), torch.cat([y for _, y in batches])

    return features


def _second_task(method: MOS) -> tuple[Task, torch.Tensor]:
    """Puts ``method`` at the end of task 1 (classes 2, 3; 7 images each, interleaved) with a random task-0 adapter
    and a random running adapter; returns the task and the running adapter ``[P]``."""
    generator = torch.Generator().manual_seed(1)
    _grow(method, 2, 2)
    method.adapter_bank[0] = 0.1 * torch.randn(method.adapter_bank.shape[1], generator=generator)
    for param in method.adapter.parameters():
        param.data = 0.1 * torch.randn(param.shape, generator=generator)
    images = torch.randn(14, 3, 16, 16, generator=generator)
    data = _Images(images, [3, 2] * 7)
    task = Task(index=1, name="t1", classes=(2, 3), class_names=("2", "3"), train=data, test=data)
    method.eval()
    return task, method.adapter.vector()


def test_pulled_statistics_follow_the_authors_in_place_pulls() -> None:
    # The tiny ViT has 2 blocks: a training step pulls 3 times, so merge_momentum 1 - 0.9^3 is a pull of 0.1.
    method = _mos(merge_momentum=1 - 0.9**3, align=False)
    task, start = _second_task(method)
    features = _features_in_batches_of(method, 3)
    method.after_task(task, features)

    # The authors' pass, literally: class by class, each forward pulls every block's adapter in place once per
    # block (A <- 0.9 A + 0.1 M), and block l runs with its adapter as it is after the (l + 1)-th pull.
    blocks = method.backbone.model.blocks
    block_of = torch.cat(
        [
            torch.full((p.numel(),), next(i for i, b in enumerate(blocks) if any(p is q for q in b.parameters())))
            for p in method.adapter.parameters()
        ]
    )  # [P]
    mean, adapter, expected = method.adapter_bank[0], start.clone(), {2: [], 3: []}
    for c in (2, 3):
        images = task.train.images[torch.tensor(task.train.targets) == c]
        for batch in images.split(3):
            after_pull = []
            for _ in blocks:
                adapter = 0.9 * adapter + 0.1 * mean
                after_pull.append(adapter.clone())
            used = torch.stack(after_pull)[block_of, torch.arange(len(block_of))]  # [P]
            with torch.no_grad():
                expected[c].append(method.adapter.run_with(used, batch))
    for c in (2, 3):
        torch.testing.assert_close(method.gaussians.means[c], torch.cat(expected[c]).mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(method.adapter.vector(), adapter)  # the next task starts from the pulled adapter
    torch.testing.assert_close(method.adapter_bank[1], start)  # task 1's stored adapter is the one before the pass


def test_task_statistics_use_the_task_adapter_and_leave_it_alone() -> None:
    pulled, own = _mos(align=False), _mos(align=False, statistics_adapter="task")
    for method in (pulled, own):
        task, start = _second_task(method)
        method.after_task(task, _features_in_batches_of(method, 3))
    torch.testing.assert_close(own.adapter.vector(), start)
    images = task.train.images[torch.tensor(task.train.targets) == 2]
    with torch.no_grad():
        torch.testing.assert_close(own.gaussians.means[2], own._embed_with(images, start).mean(0), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(pulled.gaussians.means[2:4], own.gaussians.means[2:4], atol=1e-3)
    assert not torch.allclose(pulled.adapter.vector(), start, atol=1e-3)


def test_the_first_task_is_never_pulled() -> None:
    method = _mos(align=False)
    _grow(method, 2)
    images = torch.randn(6, 3, 16, 16)
    data = _Images(images, [0, 1] * 3)
    for param in method.adapter.parameters():
        param.data.normal_(std=0.1)
    start = method.adapter.vector()
    method.eval()
    task = Task(index=0, name="t0", classes=(0, 1), class_names=("0", "1"), train=data, test=data)
    method.after_task(task, _features_in_batches_of(method, 2))
    torch.testing.assert_close(method.adapter.vector(), start)
    with torch.no_grad():
        torch.testing.assert_close(method.gaussians.means[0], method._embed_with(images[0::2], start).mean(0))


def test_new_head_rows_start_as_timms_vit_head() -> None:
    method = _mos()
    _grow(method, 200)
    assert method.head.bias.abs().max() == 0
    assert method.head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    default = _mos(head_init="default")
    _grow(default, 200)
    assert default.head.bias.abs().max() > 0
