"""The line per task: its cost, the seen-class accuracy that Ā averages, and an ETA; ``--quiet`` silences it."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from cil import metrics
from cil._progress import Progress
from cil.cli import main
from cil.method import create_method
from tests.conftest import empty_tasks, run_engine, tiny_backbone, tiny_stream

ROOT_TINY_OVERRIDES = str(Path(__file__).resolve().parent / "data" / "tiny_overrides.yaml")

LINE = re.compile(r"task (\d)/5 (\S+): fit [\d.]+ s, eval [\d.]+ s, A_(\d) = ([\d.]+) %; (.*)")


def test_a_line_per_task_with_the_seen_accuracy_and_the_time_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="cil.engine"):
        engine = run_engine(tmp_path, create_method("simplecil", tiny_backbone()), tiny_stream())
    lines = [LINE.fullmatch(record.getMessage()) for record in caplog.records if "fit " in record.getMessage()]
    assert len(lines) == 5 and all(lines)
    expected = metrics.seen_accuracy(engine.accuracy_matrix(), [30] * 5)  # 15 test images per class, 2 classes
    for step, found in enumerate(lines):
        assert found is not None
        assert int(found[1]) == int(found[3]) == step + 1 and found[2] == engine.stream.tasks[step].name
        assert float(found[4]) == pytest.approx(expected[step], abs=0.05)
    assert lines[0] is not None and lines[0][5].startswith("4 tasks left, about ")
    assert lines[-1] is not None and lines[-1][5].startswith("stream done in ")


def test_the_time_left_follows_the_images_each_step_handles(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = empty_tasks(2, 2, 2)
    sizes = {0: (100, 10), 1: (300, 10), 2: (100, 10)}  # (train, test) images per task
    tasks = [
        type(t)(**{**t.__dict__, "train": [0] * sizes[i][0], "test": [0] * sizes[i][1]}) for i, t in enumerate(tasks)
    ]
    clock = iter([0.0, 11.0])
    monkeypatch.setattr("cil._progress.time.perf_counter", lambda: next(clock))
    progress = Progress(tasks, start=0)
    rows = [
        {"train_task": 0, "eval_task": 0, "accuracy": 80.0, "n_test": 10},
        {"train_task": 0, "eval_task": 1, "accuracy": 0.0, "n_test": 10},  # a future task (evaluate_future): not A_1
    ]
    line = progress.line(tasks[0], {"fit_s": 10.0, "eval_s": 1.0}, rows)
    # 11 s for 110 images; 320 + 130 images to go: 45 s
    assert line == "task 1/3 t0: fit 10 s, eval 1.0 s, A_1 = 80.0 %; 2 tasks left, about 45 s"


def test_quiet_prints_no_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    config = str(Path(__file__).resolve().parents[1] / "configs/experiments/quickstart.yaml")
    arguments = ["run", "--config", config, "--config", ROOT_TINY_OVERRIDES, "--method", "simplecil"]
    try:
        with caplog.at_level(logging.INFO):
            assert main([*arguments, "--out", str(tmp_path / "loud")]) == 0
            assert "A_2 = " in caplog.text
            caplog.clear()
            assert main([*arguments, "--out", str(tmp_path / "quiet"), "--quiet", "true"]) == 0
            assert "A_2 = " not in caplog.text and "Summary:" in capsys.readouterr().out
    finally:
        logging.getLogger("cil").setLevel(logging.NOTSET)
    loud, quiet = ((tmp_path / name / "accuracy_matrix.csv").read_text() for name in ("loud", "quiet"))
    assert quiet == loud
