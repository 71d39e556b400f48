"""Experiment trackers follow a whole run (cil.tracking): one tracker run per `cil run`, training steps that go on
across tasks, each task's accuracies at its index, the summary and the accuracy matrix at the end. W&B (offline) and
MLflow (local file store) are checked in the files they write; the rest with a logger that records its calls."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pandas as pd
import pytest
import yaml
from lightning.pytorch.loggers import Logger

from cil.cli import main
from cil.engine import Engine, config_hash
from cil.tables import _check_groups_differ_only_in_seed
from methods.finetune import Finetune
from tests.conftest import TINY_DATA, cpu_trainers, crash_during, tiny_backbone, tiny_stream

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny_overrides.yaml")
FINETUNE = str(ROOT / "configs" / "experiments" / "quickstart_finetune.yaml")


class RecordingLogger(Logger):
    """Keeps every call a tracker gets."""

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any, Any]] = []
        self.fail_on = fail_on

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def _record(self, kind: str, payload: Any, step: Any = None) -> None:
        if kind == self.fail_on:
            raise ConnectionError(f"tracker down during {kind}")
        self.calls.append((kind, payload, step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self._record("hyperparams", params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._record("metrics", dict(metrics), step)

    def finalize(self, status: str) -> None:
        self._record("finalize", status)

    def metrics(self, prefix: str) -> list[tuple[int, dict[str, float]]]:
        """``(step, metrics)`` of the logged metrics whose names start with ``prefix``."""
        found = []
        for kind, payload, step in self.calls:
            chosen = {k: v for k, v in payload.items() if k.startswith(prefix)} if kind == "metrics" else {}
            if chosen:
                found.append((step, chosen))
        return found


def _engine(out: Path, loggers: list[Logger], method: Finetune | None = None, **engine: Any) -> Engine:
    engine.setdefault("config", {"test": "tracking"})
    return Engine(
        method or Finetune(tiny_backbone()),
        tiny_stream(increment=4),  # 3 tasks: 4, 4 and 2 classes
        out,
        trainer_factory=cpu_trainers(out),
        data=TINY_DATA,
        seed=7,
        trackers=loggers,
        **engine,
    )


def test_one_tracker_run_follows_every_task(tmp_path: Path) -> None:
    tracker = RecordingLogger()
    engine = _engine(tmp_path, [tracker])
    summary = engine.run()
    kinds = [kind for kind, _, _ in tracker.calls]
    assert kinds.count("hyperparams") == 1 and kinds[0] == "hyperparams"  # the run's config, not each fit's hparams
    assert tracker.calls[0][1] == {"test": "tracking", "config_hash": engine.config_hash}
    assert kinds.count("finalize") == 1 and tracker.calls[-1] == ("finalize", "success", None)
    # training: the steps of consecutive fits follow each other (one x-axis for the stream)
    train_steps = [step for step, _ in tracker.metrics("train/loss_step")]
    assert train_steps == sorted(train_steps) and len(set(train_steps)) == len(train_steps) > 3
    fits = pd.read_csv(tmp_path / "tasks.csv")
    assert len(train_steps) == sum(-(-int(n) // TINY_DATA.batch_size) for n in fits["n_train"])
    # each task at its index: A_t, and R[t, j] for every seen task j
    matrix = pd.read_csv(tmp_path / "accuracy_matrix.csv", index_col=0).to_numpy()
    per_task = tracker.metrics("eval/")
    assert [step for step, _ in per_task] == [0, 1, 2]
    for t, metrics in per_task:
        assert metrics["eval/seen_acc"] == summary["seen_accuracy"][t]
        assert [metrics[f"eval/task_{j:03d}_acc"] for j in range(t + 1)] == pytest.approx(matrix[t, : t + 1], abs=1e-4)
        assert f"eval/task_{t + 1:03d}_acc" not in metrics
    # the end: every number of summary.json
    [(step, final)] = tracker.metrics("summary/")
    assert step == 2
    assert final["summary/avg_incremental_acc"] == summary["avg_incremental_acc"]
    assert final["summary/last_acc"] == json.loads((tmp_path / "summary.json").read_text())["last_acc"]


def test_a_resumed_run_logs_its_finished_tasks_first(tmp_path: Path) -> None:
    first = RecordingLogger()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _engine(tmp_path, [first], method=crash_during(Finetune(tiny_backbone()), 2)).run()
    assert first.calls[-1] == ("finalize", "failed", None)  # the crash is the tracker run's status
    assert [step for step, _ in first.metrics("eval/")] == [0, 1]
    assert first.metrics("summary/")[0][1]["summary/finished_tasks"] == 2
    second = RecordingLogger()
    _engine(tmp_path, [second], resume=True).run()
    assert second.metrics("eval/")[:2] == first.metrics("eval/")  # the replay: as logged then
    assert [step for step, _ in second.metrics("eval/")] == [0, 1, 2]


def test_a_tracker_that_fails_mid_run_is_reported_once_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken, healthy = RecordingLogger(fail_on="metrics"), RecordingLogger()
    with caplog.at_level(logging.WARNING, logger="cil.tracking"):
        summary = _engine(tmp_path, [broken, healthy]).run()
    assert summary["complete"] and len(healthy.metrics("eval/")) == 3
    warnings = [r.getMessage() for r in caplog.records if "trainer.logger RecordingLogger failed" in r.getMessage()]
    assert len(warnings) == 1 and "tracker down during metrics" in warnings[0]


def test_a_tracker_that_cannot_start_stops_the_run_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^trainer\.logger RecordingLogger could not start: tracker down"):
        _engine(tmp_path / "run", [RecordingLogger(fail_on="hyperparams")]).run()
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "results.csv").exists()


def test_trackers_do_not_change_the_config_hash() -> None:
    """Adding or changing a tracker keeps a run resumable."""
    config = {"trainer": {"max_epochs": 1}, "stream": {"name": "x"}}
    tracked = {
        **config,
        "trainer": {"max_epochs": 1, "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger"}},
    }
    assert config_hash(tracked) == config_hash(config)


def _cli(tmp_path: Path, logger: Any, config: str = FINETUNE) -> list[str]:
    overrides = tmp_path / "logger.yaml"
    overrides.write_text(yaml.safe_dump({"trainer": {"logger": logger}}))
    return ["run", "--config", config, "--config", TINY, "--config", str(overrides), "--out", str(tmp_path / "run")]


def test_cli_refuses_a_logger_that_is_not_a_lightning_logger(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_cli(tmp_path, True)) != 0
    error = capsys.readouterr().err.strip()
    assert "trainer.logger must be a Lightning logger" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_takes_any_lightning_logger_by_class_path(tmp_path: Path) -> None:
    """A CSVLogger as the tracker: one metrics.csv for the whole run (Lightning alone writes one per fit)."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}}
    assert main(_cli(tmp_path, logger)) == 0
    [metrics_file] = (tmp_path / "csv").rglob("metrics.csv")
    logged = pd.read_csv(metrics_file)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert logged["summary/avg_incremental_acc"].dropna().tolist() == [summary["avg_incremental_acc"]]
    assert logged["eval/seen_acc"].dropna().tolist() == summary["seen_accuracy"]
    steps = logged.dropna(subset=["train/loss_step"])["step"].tolist()
    assert steps == sorted(set(steps)) and len(steps) == 8  # 2 fits of max_steps_per_fit 4 steps, one after another


def test_a_tracker_that_cannot_start_ends_the_ones_already_started_as_failed(tmp_path: Path) -> None:
    started, broken = RecordingLogger(), RecordingLogger(fail_on="hyperparams")
    with pytest.raises(ValueError, match="could not start"):
        _engine(tmp_path / "run", [started, broken]).run()
    assert started.calls[-1] == ("finalize", "failed", None) and not (tmp_path / "run").exists()


def test_a_forgotten_resume_is_refused_before_it_makes_a_tracker_run(tmp_path: Path) -> None:
    _engine(tmp_path, []).run()
    late = RecordingLogger()
    with pytest.raises(FileExistsError, match="--resume"):
        _engine(tmp_path, [late]).run()
    assert late.calls == []


def test_hyperparameters_are_what_identifies_the_run(tmp_path: Path) -> None:
    """Run-control keys (out, resume, ...) and trackers stay out: a resumed run logs the same hyper-parameters, which
    MLflow requires (it refuses a changed parameter)."""
    config = {"out": str(tmp_path), "resume": False, "stream": {"name": "x"}, "trainer": {"max_epochs": 1}}
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.MLFlowLogger"}
    tracker = RecordingLogger()
    _engine(tmp_path, [tracker], config=config).run()
    assert tracker.calls[0][1] == {"stream": {"name": "x"}, "trainer": {"max_epochs": 1}, "config_hash": ANY}


@pytest.mark.parametrize(
    ("logger", "expected"),
    [
        (
            {"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 3}},
            "trainer.logger: Import path torch.nn.Linear does not correspond to a subclass of Logger",
        ),
        (
            {"class_path": "lightning.pytorch.loggers.WandbLoger"},
            "trainer.logger: Problem with given class_path 'lightning.pytorch.loggers.WandbLoger': module "
            "'lightning.pytorch.loggers' has no attribute 'WandbLoger'",
        ),
    ],
    ids=["not-a-logger", "misspelt"],
)
def test_a_class_path_that_is_not_a_logger_is_named_in_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, logger: dict[str, Any], expected: str
) -> None:
    """Was `cil run: error: - (`cil run --help` lists the options)`, and the misspelt class without its key."""
    assert main(_cli(tmp_path, logger)) != 0
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1] == f"cil run: error: {expected} (`cil run --help` lists the options)"
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_failed_mid_run_is_still_finalized_with_the_run_status(tmp_path: Path) -> None:
    """A W&B run left open after one failed call is reused by the next run of the process (the next seed)."""
    broken = RecordingLogger(fail_on="metrics")
    _engine(tmp_path, [broken]).run()
    assert [call for call in broken.calls if call[0] == "finalize"] == [("finalize", "success", None)]


def test_a_resumed_run_continues_the_training_steps(tmp_path: Path) -> None:
    full = RecordingLogger()
    _engine(tmp_path / "full", [full]).run()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _engine(tmp_path / "r", [RecordingLogger()], method=crash_during(Finetune(tiny_backbone()), 2)).run()
    resumed = RecordingLogger()
    _engine(tmp_path / "r", [resumed], resume=True).run()
    last = [step for step, _ in full.metrics("train/loss_step")][-len(resumed.metrics("train/loss_step")) :]
    assert [step for step, _ in resumed.metrics("train/loss_step")] == last


def test_a_finished_seed_of_a_sweep_makes_no_new_tracker_run(tmp_path: Path) -> None:
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}}
    args = [*_cli(tmp_path, logger), "--seeds", "1993"]
    assert main(args) == 0 and main(args) == 0  # the second sweep skips the finished seed
    assert len(list((tmp_path / "csv").rglob("metrics.csv"))) == 1


def test_cil_table_averages_seeds_that_differ_only_in_their_tracker() -> None:
    frame = pd.DataFrame(
        {
            "method": ["finetune"] * 2,
            "stream": ["s"] * 2,
            "seed": [1993, 1994],
            "config.trainer.logger.init_args.name": ["seed-1993", "seed-1994"],
        }
    )
    _check_groups_differ_only_in_seed(frame, ["method", "stream"])


# ---- W&B offline and MLflow's local file store: what reaches the real trackers -----------------------------------
def _wandb_records(run_file: Path) -> list[Any]:
    """The records of an offline W&B run file (``run-<id>.wandb``): a 7-byte header, then LevelDB-log blocks of 32 KiB
    whose records carry a 7-byte header (CRC-32, length, kind: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0:
            break
    return records


def _wandb_items(records: list[Any], kind: str) -> list[dict[str, Any]]:
    """Each ``kind`` record (``history``, ``summary``, ``config``) as a dict of its values."""
    found = []
    for record in records:
        if record.WhichOneof("record_type") != kind:
            continue
        items = {"history": lambda r: r.history.item, "summary": lambda r: r.summary.update}.get(kind)
        entries = items(record) if items else record.config.update
        found.append({e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries})
    return found


@pytest.mark.slow
def test_wandb_offline_run_holds_the_summary_and_the_accuracy_matrix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "cil-test", "save_dir": str(tmp_path / "wandb"), "offline": True},
    }
    assert main(_cli(tmp_path, logger)) == 0
    [run_file] = (tmp_path / "wandb").rglob("run-*.wandb")  # one tracker run for the whole stream
    records = _wandb_records(run_file)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    final: dict[str, Any] = {}
    for update in _wandb_items(records, "summary"):
        final.update(update)
    assert final["summary/avg_incremental_acc"] == summary["avg_incremental_acc"]
    assert final["summary/last_acc"] == summary["last_acc"]
    history = _wandb_items(records, "history")
    assert [h["eval/seen_acc"] for h in history if "eval/seen_acc" in h] == summary["seen_accuracy"]
    assert [h["task"] for h in history if "eval/seen_acc" in h] == [0, 1]
    config = {k: v for update in _wandb_items(records, "config") for k, v in update.items()}
    assert config["config_hash"] == config_hash(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    [table_file] = run_file.parent.rglob("accuracy_matrix_*.table.json")
    table = json.loads(table_file.read_text())
    matrix = pd.read_csv(tmp_path / "run" / "accuracy_matrix.csv", index_col=0)
    assert [row[1:] for row in table["data"]] == [[None if pd.isna(v) else v for v in row] for row in matrix.to_numpy()]


@pytest.mark.slow
def test_mlflow_file_store_run_holds_the_summary_and_the_run_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for those who ask
    store = tmp_path / "mlruns"
    logger = {
        "class_path": "lightning.pytorch.loggers.MLFlowLogger",
        "init_args": {"experiment_name": "cil-test", "tracking_uri": f"file:{store}"},
    }
    assert main(_cli(tmp_path, logger)) == 0
    [run] = [meta.parent for meta in store.glob("*/*/meta.yaml")]  # one tracker run for the whole stream
    assert yaml.safe_load((run / "meta.yaml").read_text())["status"] == 3  # FINISHED

    def metric(name: str) -> list[tuple[int, float]]:  # (step, value) from lines of `timestamp value step`
        lines = (run / "metrics" / name).read_text().splitlines()
        return [(int(step), float(value)) for _, value, step in map(str.split, lines)]

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert metric("summary/avg_incremental_acc") == [(1, summary["avg_incremental_acc"])]
    assert metric("eval/seen_acc") == [(0, summary["seen_accuracy"][0]), (1, summary["seen_accuracy"][1])]
    steps = [step for step, _ in metric("train/loss_step")]
    assert steps == list(range(8))  # the second task's steps follow the first's
    assert (run / "params" / "config_hash").read_text() == config_hash(
        yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    )
    assert (run / "artifacts" / "run" / "summary.json").read_text() == (tmp_path / "run" / "summary.json").read_text()
    table = json.loads((run / "artifacts" / "accuracy_matrix.json").read_text())
    assert len(table["data"]) == 2 and table["columns"][0] == "after task"


def test_tensorboard_gets_the_accuracy_matrix_as_a_markdown_table(tmp_path: Path) -> None:
    """TensorBoard has no tables: the matrix is a text, one row per step (tensorboard itself is not installed here,
    so a stand-in receives it)."""
    from types import SimpleNamespace

    from cil.tracking import _tensorboard_table

    pd.DataFrame([[90.0, None], [70.0, 80.0]], index=["t0", "t1"], columns=["t0", "t1"]).to_csv(
        tmp_path / "accuracy_matrix.csv"
    )
    texts: list[tuple[str, str]] = []
    logger = SimpleNamespace(experiment=SimpleNamespace(add_text=lambda tag, text: texts.append((tag, text))))
    _tensorboard_table(logger, {"task_names": ["cats", "dogs"]}, tmp_path)  # type: ignore[arg-type]
    assert texts == [
        (
            "accuracy_matrix",
            "| after task | 0: cats | 1: dogs |\n|---|---|---|\n| 0 | 90.00 |  |\n| 1 | 70.00 | 80.00 |",
        )
    ]
