"""Engine: hook order, the run directory after every task, resume, refusal to mix runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from cil.engine import Engine, describe_stream, make_trainer_factory, stream_fingerprint
from cil.method import FeatureFn
from cil.task import Task
from methods.finetune import Finetune
from tests.conftest import TINY_DATA, cpu_trainers, run_engine, tiny_backbone, tiny_stream


class RecordingMethod(Finetune):
    """Fine-tuning that records the engine's calls (and can crash on demand)."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__(tiny_backbone(), optimizer="adamw", lr=1e-3)
        self.calls: list[str] = []
        self.crash_at = crash_at

    def before_task(self, task: Task) -> None:
        self.calls.append(f"before_task:{task.index}")

    def on_fit_start(self) -> None:
        self.calls.append(f"fit:{self.task_index}")
        if self.crash_at == self.task_index:
            raise RuntimeError("simulated crash")

    def after_task(self, task: Task, features: FeatureFn) -> None:
        self.calls.append(f"after_task:{task.index}")

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        if not self.training and self.calls and not self.calls[-1].startswith("eval"):
            self.calls.append(f"eval:{self.task_index}")
        return super().classify(z)


def run(out: Path, method: Any = None, stream: Any = None, **kwargs: Any) -> Engine:
    return run_engine(out, method or RecordingMethod(), stream or tiny_stream(), **kwargs)


def test_hook_order(tmp_path: Path) -> None:
    engine = run(tmp_path, stream=tiny_stream(increment=5))
    assert engine.method.calls == [
        "before_task:0", "fit:0", "after_task:0", "eval:0",
        "before_task:1", "fit:1", "after_task:1", "eval:1",
    ]  # fmt: skip


def test_run_directory_contract(tmp_path: Path) -> None:
    engine = run(tmp_path)
    results = pd.read_csv(tmp_path / "results.csv")
    for column in ["method", "stream", "seed", "train_task", "eval_task", "n_seen_classes", "accuracy", "n_test"]:
        assert column in results.columns
    assert len(results) == 5 * 6 // 2  # lower triangle of a 5x5 matrix
    assert results.groupby("train_task")["n_seen_classes"].first().tolist() == [2, 4, 6, 8, 10]
    summary = json.loads((tmp_path / "summary.json").read_text())
    keys = ["avg_incremental_acc", "last_acc", "avg_forgetting", "bwt", "fwt", "wall_s", "train_images_per_s"]
    keys += ["eval_images_per_s", "trainable_params", "total_params"]
    assert set(keys) <= set(summary)
    assert summary["complete"] is True
    assert summary["trainable_params"] == sum(p.numel() for p in engine.method.parameters())
    matrix = pd.read_csv(tmp_path / "accuracy_matrix.csv", index_col=0)
    assert matrix.shape == (5, 5) and matrix.isna().to_numpy().sum() == 10
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"task_{i:03d}.ckpt" for i in range(5)]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "logs" / "task_004").is_dir()
    assert not list(tmp_path.rglob("*.tmp"))


def test_crash_keeps_finished_tasks_and_resume_is_identical(tmp_path: Path) -> None:
    reference = run(tmp_path / "reference")
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed, method=RecordingMethod(crash_at=3))
    partial = pd.read_csv(crashed / "results.csv")
    assert sorted(partial["train_task"].unique()) == [0, 1, 2]  # finished tasks survive the crash
    resumed = run(crashed, resume=True)
    assert resumed.method.calls[0] == "before_task:3"  # tasks 0-2 were not redone
    pd.testing.assert_frame_equal(pd.read_csv(crashed / "results.csv"), pd.read_csv(tmp_path / "reference/results.csv"))
    assert reference.summary()["last_acc"] == resumed.summary()["last_acc"]


def test_refuses_to_overwrite_and_to_resume_another_config(tmp_path: Path) -> None:
    run(tmp_path, stream=tiny_stream(increment=5))
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path, stream=tiny_stream(increment=5))
    engine = Engine(
        RecordingMethod(),
        tiny_stream(increment=5),
        tmp_path,
        trainer_factory=cpu_trainers(tmp_path),
        config={"test": "another"},
        resume=True,
    )
    with pytest.raises(ValueError, match=r"different config.*test"):
        engine.run()


class _Payload:
    """A pickle that runs code when loaded: it creates the file named in its argument."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("planted", ["pickle", "not_a_checkpoint"])
def test_resume_never_runs_code_from_the_run_directory(planted: str, tmp_path: Path) -> None:
    """A file planted as the newest checkpoint is refused in one line, and what it carries never runs."""
    out, marker = tmp_path / "run", tmp_path / "payload_ran"
    run(out, stream=tiny_stream(increment=5))
    newest = out / "checkpoints" / "task_009.ckpt"
    if planted == "pickle":
        torch.save({"config_hash": _Payload(marker)}, newest)
    else:
        torch.save({"weights": torch.zeros(3)}, newest)  # loads safely, but is not a cil checkpoint
    with pytest.raises(ValueError, match=r"task_009\.ckpt") as refused:
        run(out, stream=tiny_stream(increment=5), resume=True)
    assert "\n" not in str(refused.value) and "delete it" in str(refused.value)
    assert not marker.exists()


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    """The run directory's lock is held by another process (as a second `cil run` would find it): refused in one
    line, nothing of the run written; once that process is gone, the run goes ahead."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
            str(tmp_path / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileExistsError, match="another cil run is writing") as refused:
            run(tmp_path, stream=tiny_stream(increment=5))
        assert "\n" not in str(refused.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    run(tmp_path, stream=tiny_stream(increment=5))  # the kernel released the lock with its process
    assert (tmp_path / "summary.json").is_file()


def test_resume_refuses_a_changed_stream_and_names_the_change(tmp_path: Path) -> None:
    run(tmp_path, stream=tiny_stream(increment=5))
    (tmp_path / "checkpoints" / "task_001.ckpt").unlink()  # stopped during the last task
    changed = tiny_stream(increment=5, train_per_class=39)  # one image fewer per class, as if files were removed
    with pytest.raises(ValueError, match=r"stream changed.*tasks\.1\.n_train"):
        run(tmp_path, stream=changed, resume=True)
    run(tmp_path, stream=tiny_stream(increment=5), resume=True)  # the original stream resumes


def test_the_stream_fingerprint_sees_relabelled_images_that_the_description_does_not() -> None:
    stream, relabelled = tiny_stream(increment=5), tiny_stream(increment=5)
    first = relabelled.tasks[0].train
    first.indices[0], first.indices[1] = first.indices[1], first.indices[0]  # two images of different classes swap
    assert describe_stream(stream) == describe_stream(relabelled)
    assert stream_fingerprint(stream) != stream_fingerprint(relabelled)
    assert stream_fingerprint(stream) == stream_fingerprint(tiny_stream(increment=5))


def test_keep_checkpoints(tmp_path: Path) -> None:
    run(tmp_path, keep_checkpoints=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["task_003.ckpt", "task_004.ckpt"]


@pytest.mark.parametrize(
    ("method_asks", "expected"),
    [({"max_epochs": 20}, 3), ({"max_steps": 500, "max_epochs": -1}, 3), ({"max_steps": 2}, 2), ({}, 3)],
)
def test_max_steps_per_fit_caps_whatever_the_method_asks(
    method_asks: dict[str, Any], expected: int, tmp_path: Path
) -> None:
    factory = make_trainer_factory(tmp_path, {"accelerator": "cpu", "max_epochs": 5}, max_steps_per_fit=3)
    assert factory(0, [], method_asks).max_steps == expected
    uncapped = make_trainer_factory(tmp_path, {"accelerator": "cpu", "max_epochs": 5})
    assert uncapped(0, [], method_asks).max_steps == method_asks.get("max_steps", -1)


class _StepCounting(RecordingMethod):
    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.steps.append(0)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps[-1] += 1
        return super().training_step(batch, batch_idx)

    def trainer_overrides(self, task: Task) -> dict[str, Any]:
        return {"max_epochs": 50}  # a method that asks for far more than the cap


def test_a_capped_run_trains_each_task_for_the_cap(tmp_path: Path) -> None:
    method = _StepCounting()
    trainers = make_trainer_factory(
        tmp_path, {"accelerator": "cpu", "enable_progress_bar": False}, logger="none", max_steps_per_fit=2
    )
    Engine(method, tiny_stream(increment=5), tmp_path, trainer_factory=trainers, data=TINY_DATA, seed=0).run()
    assert method.steps == [2, 2]


@pytest.mark.parametrize("verbose", [False, True])
def test_the_python_api_is_quiet_by_default_and_records_its_configuration(
    verbose: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging
    import warnings

    import yaml

    from cil.method import create_method

    for part in ("pytorch", "fabric"):  # undo conftest's quieting: the engine must do it itself
        monkeypatch.setattr(logging.getLogger(f"lightning.{part}.utilities.rank_zero"), "level", logging.INFO)
    trainers = make_trainer_factory(tmp_path, {"accelerator": "cpu", "enable_progress_bar": False})
    engine = Engine(
        create_method("simplecil", tiny_backbone()),
        tiny_stream(increment=5),
        tmp_path,
        trainer_factory=trainers,
        data=TINY_DATA,
        seed=7,
        verbose=verbose,
    )
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.run()
    printed = caplog.text  # what reaches the handlers (Lightning prints through its own)
    assert ("GPU available" in printed) is verbose  # Lightning's banner, once per Trainer, only when asked for
    assert verbose or not [w for w in caught if "LeafSpec" in str(w.message) or "many workers" in str(w.message)]
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["method"]["class_path"] == "methods.simplecil.SimpleCIL"
    assert config["stream"]["name"] == "sklearn_digits" and config["seed_everything"] == 7
    assert config["backbone"]["name"] == "vit_tiny_patch16_224" and config["data"]["batch_size"] == 32
    described = json.loads((tmp_path / "stream.json").read_text())  # the class order, task by task
    assert [t["classes"] for t in described["tasks"]] == [list(task.classes) for task in engine.stream]
    assert [t["class_names"] for t in described["tasks"]] == [list(task.class_names) for task in engine.stream]
