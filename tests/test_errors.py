"""Bad input is one line on stderr that names the key or file and what to fix, a non-zero exit status, and nothing
written into the run directory when the error can be known before training (issue 18, items 2, 3, 10, 11)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from cil.cli import _one_line, main
from cil.results import RESULT_COLUMNS
from cil.task import Task

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/experiments/quickstart_finetune.yaml")
TINY = str(ROOT / "tests" / "data" / "tiny_overrides.yaml")


def _error_line(capsys: pytest.CaptureFixture[str], command: str = "run") -> str:
    """The one error line of a failed command: stderr's last line, and no other line is an error or a traceback."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    assert lines[-1].startswith(f"cil {command}: error: "), "\n".join(lines)
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], "\n".join(lines)
    return lines[-1]


# (extra arguments, what the line must contain); {tmp} is the test's tmp_path, which holds `a_file` (a text file)
# and `list.yaml` (a YAML list).
RUN_CASES = [
    pytest.param(
        ["--trainer.accelerator", "gpu"],
        ["trainer.accelerator='gpu'", "--trainer.accelerator auto"],
        id="accelerator-gpu-without-gpu",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
    ),
    pytest.param(["--trainer.devices", "0"], ["trainer.devices='0'", "--trainer.devices"], id="devices-0"),
    pytest.param(
        ["--trainer.max_epochs", "-1", "--max_steps_per_fit", "null"],
        ["trainer.max_epochs -1", "trainer.max_steps", "forever"],
        id="max_epochs--1-without-max_steps",
    ),
    pytest.param(["--trainer.max_epochs", "-2"], ["trainer.max_epochs=-2", "You passed in -2"], id="max_epochs--2"),
    pytest.param(
        ["--trainer.precision", "transformer-engine"],
        ["trainer.precision='transformer-engine'", "transformer_engine", "--trainer.precision 32-true"],
        id="precision-transformer-engine-not-installed",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("transformer_engine") is not None, reason="transformer_engine is installed"
        ),
    ),
    pytest.param(
        ["--trainer.precision", "17-bogus"],
        ["trainer.precision: '17-bogus' is not accepted", "one of 64, 32, 16,", "32-true", "bf16-mixed"],
        id="precision-17-bogus",
    ),
    pytest.param(["--stream.increment", "two"], ["stream.increment must be int", "got 'two'"], id="stream-option-type"),
    pytest.param(
        ["--stream", "{name: sklearn_digits, increment: 5, order: [a, b, c, d, e, f, g, h, i, j]}"],
        ["stream.order must be list[int] | None", "['a', 'b',"],
        id="stream-order-not-integers",
    ),
    pytest.param(
        ["--stream", "{name: image_folder_split, train_root: {tmp}/a_file, test_root: {tmp}/a_file}"],
        ["'{tmp}/a_file' is a file", "folder of class folders"],
        id="image-folder-root-is-a-file",
    ),
    pytest.param(
        ["--out", "{tmp}/a_file/run"],
        ["'{tmp}/a_file/run'", "'{tmp}/a_file' is a file", "choose another --out"],
        id="out-under-a-file",
    ),
    pytest.param(
        ["--backbone.checkpoint_path", "{tmp}/a_file"],
        ["backbone.checkpoint_path '{tmp}/a_file' is not a checkpoint", "torch.save"],
        id="checkpoint-path-not-a-checkpoint",
    ),
    pytest.param(
        ["--seed_everything", "-5"],
        ["seed_everything must be between 0 and 4294967295", "got -5"],
        id="seed-negative",
    ),
    pytest.param(
        ["--seed_everything", str(2**32 - 1)],
        ["seed_everything 4294967295 is out of range for 2 tasks", "from 0 to 4294967294"],
        id="seed-too-large-for-the-tasks",
    ),
    pytest.param(
        ["--config", "{tmp}/list.yaml"],
        ["config file '{tmp}/list.yaml' holds a YAML list, not a mapping"],
        id="config-file-is-a-list",
    ),
]


@pytest.mark.parametrize(("extra", "says"), RUN_CASES)
def test_bad_run_input_is_one_line_and_writes_nothing(
    extra: list[str], says: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a_file").write_text("not a checkpoint, not a folder\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    extra = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    out = Path(extra[extra.index("--out") + 1]) if "--out" in extra else tmp_path / "run"
    code = main(["run", "--config", CONFIG, "--config", TINY, "--out", str(out), *extra])
    line = _error_line(capsys)
    assert code != 0
    for part in says:
        assert part.replace("{tmp}", str(tmp_path)) in line
    assert not out.exists() or not any(out.iterdir())


def test_the_one_line_shortener_keeps_a_minus_sign() -> None:
    assert _one_line(ValueError("-5 is not in bounds, numpy accepts from 0 to 4294967295")).startswith("-5 is")
    assert _one_line(ValueError("a list:\n  - first\n  - -2 is wrong")) == "a list: first -2 is wrong"


def test_a_corrupt_image_read_by_a_worker_is_its_first_meaningful_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With DataLoader workers the error comes back with the worker's traceback inside its message: the line keeps
    the loader's own message, which names the file."""
    from PIL import Image

    for split in ("train", "test"):
        for label in range(2):
            folder = tmp_path / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 90 * label, 0)).save(folder / f"{i}.png")
    corrupt = tmp_path / "train" / "class_0" / "1.png"
    corrupt.write_bytes(b"not a png")
    stream = f"{{name: image_folder_split, train_root: {tmp_path / 'train'}, test_root: {tmp_path / 'test'}}}"
    args = ["--stream", stream, "--stream.increment", "2", "--data.num_workers", "2", "--out", str(tmp_path / "run")]
    code = main(["run", "--config", CONFIG, "--config", TINY, *args])
    line = _error_line(capsys)
    assert code != 0
    assert line.startswith(f"cil run: error: cannot read image {str(corrupt)!r} (cannot identify image file ")
    assert line.endswith("); delete or replace the file (in DataLoader worker process 0)")
    assert "File " not in line and "worker_loop" not in line  # none of the worker's traceback


def _run_dir(path: Path) -> Path:
    """A minimal finished run directory: results.csv and summary.json."""
    path.mkdir()
    rows = [{"method": "finetune", "stream": "tiny", "seed": 1, "train_task": 0, "eval_task": 0, "accuracy": 50.0}]
    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(path / "results.csv", index=False)
    summary = {"method": "finetune", "stream": "tiny", "seed": 1, "complete": True, "avg_incremental_acc": 50.0}
    (path / "summary.json").write_text(json.dumps({**summary, "last_acc": 50.0}))
    return path


SUMMARY_LIST = ("summary.json", "[1, 2]"), "summary.json' holds a JSON list, not the object"
SUMMARY_TRUNCATED = ("summary.json", '{"method": "fine'), "cannot read '{run}/summary.json' as JSON"
RESULTS_GARBAGE = (
    ("results.csv", 'train_task,eval_task,accuracy\n0,0,"50\n'),
    "cannot read '{run}/results.csv' as a CSV",
)
SUMMARY_FOLDER = ("summary.json", None), "cannot read '{run}/summary.json' (Is a directory)"
RESULTS_NOT_A_TABLE = ("results.csv", "just some text\n"), "'{run}/results.csv' is not a cil results table"


@pytest.mark.parametrize(
    ("command", "damage", "says"),
    [
        ("summarize", *SUMMARY_LIST),
        ("table", *SUMMARY_LIST),
        ("summarize", *SUMMARY_TRUNCATED),
        ("table", *SUMMARY_TRUNCATED),
        ("summarize", *RESULTS_GARBAGE),  # cil table reads the summaries only
        ("summarize", *RESULTS_NOT_A_TABLE),
        ("table", *SUMMARY_FOLDER),
    ],
    ids=[
        "summarize-list",
        "table-list",
        "summarize-truncated",
        "table-truncated",
        "garbage-csv",
        "not-a-table",
        "folder",
    ],
)
def test_a_damaged_run_directory_is_one_line_naming_the_file(
    command: str, damage: tuple[str, str | None], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path / "run")
    if damage[1] is None:
        (run / damage[0]).unlink()
        (run / damage[0]).mkdir()
    else:
        (run / damage[0]).write_text(damage[1])
    assert main([command, str(run)]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before the error (summarize used to print the table first)
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"cil {command}: error: "), captured.err
    assert says.replace("{run}", str(run)) in lines[0]


def test_an_unwritable_parent_of_out_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root nothing is unwritable, so the permission check is shown ``os.access``'s answer for a read-only folder."""
    import cil.engine

    locked = tmp_path / "read_only"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(cil.engine.os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode))
    out = locked / "run"
    code = main(["run", "--config", CONFIG, "--config", TINY, "--out", str(out)])
    line = _error_line(capsys)
    assert code != 0 and not out.exists()
    assert f"{str(locked)!r} is not writable by this user; choose another --out" in line


@pytest.mark.parametrize("shadow", ["methods.py", "streams/__init__.py"])
def test_a_methods_module_in_the_current_directory_is_refused_not_imported(shadow: str, tmp_path: Path) -> None:
    """``python -m cil.cli`` puts the current directory first on sys.path: a ``methods.py`` there must not run."""
    marker = tmp_path / "imported"
    (tmp_path / shadow).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / shadow).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "cil.cli", "run", "--config", CONFIG, "--config", TINY, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # as an editable install makes cil importable from anywhere
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert not marker.exists() and not out.exists()
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cil run: error: "), done.stderr
    package = shadow.split("/")[0].removesuffix(".py")
    assert f"{str(tmp_path / shadow)!r} shadows cil's {package!r} package" in lines[0]
    assert "rename it, or run cil from another directory" in lines[0]


def test_trainer_max_epochs_minus_one_is_refused_only_where_the_method_leaves_it(tmp_path: Path) -> None:
    """Task 0's Trainer is built, with the method's own Trainer arguments, before anything is written: a method that
    sets its epochs (APER, MOS, LAE) runs under ``trainer.max_epochs: -1``; one that does not is refused."""
    from cil.engine import Engine
    from methods import SimpleCIL
    from tests.conftest import TINY_DATA, cpu_trainers, tiny_backbone, tiny_stream

    class OneEpoch(SimpleCIL):
        def trainer_overrides(self, task: Task) -> dict[str, Any]:
            return {"max_epochs": 1}

    stream = tiny_stream(increment=5)
    refused = tmp_path / "refused"
    engine = Engine(SimpleCIL(tiny_backbone()), stream, refused, trainer_factory=cpu_trainers(refused, max_epochs=-1))
    with pytest.raises(ValueError, match=r"trainer\.max_epochs -1 trains until trainer\.max_steps"):
        engine.run()
    assert not refused.exists()
    runs = tmp_path / "runs"
    trainers = cpu_trainers(runs, max_epochs=-1)
    summary = Engine(OneEpoch(tiny_backbone()), stream, runs, trainer_factory=trainers, data=TINY_DATA).run()
    assert summary["complete"]


def test_an_os_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Any OSError (here: `cil plot --out` naming a folder) is one line with the file, not a traceback."""
    run = _run_dir(tmp_path / "run")
    (run / "tasks.csv").write_text("task,fit_s,eval_s,wall_s\n0,1,1,2\n")
    folder = tmp_path / "figure.png"
    folder.mkdir()
    assert main(["plot", str(run), "--kind", "heatmap", "--out", str(folder)]) != 0
    assert f"Is a directory: {str(folder)!r}" in _error_line(capsys, "plot")
