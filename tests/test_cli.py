"""The `cil` command line: every config parses and runs on the tiny stream, errors are one line, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cil.cli import main

ROOT = Path(__file__).resolve().parents[1]
# configs/methods/ holds method settings to layer over a config that names the backbone and the stream.
PARTIAL_BASE = ROOT / "configs/experiments/simplecil_vit_offline.yaml"
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _layers(config: Path) -> list[str]:
    partial = config.parent.name == "methods"
    return ["--config", str(PARTIAL_BASE), "--config", str(config)] if partial else ["--config", str(config)]


TINY = str(ROOT / "tests" / "data" / "tiny_overrides.yaml")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *_layers(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "method:" in printed and "stream:" in printed and "backbone:" in printed


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_runs_on_the_tiny_stream(config: Path, tmp_path: Path) -> None:
    assert main(["run", *_layers(config), "--config", TINY, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and summary["finished_tasks"] == 2
    assert (tmp_path / "config.yaml").read_text().count("sklearn_digits") == 1


def test_summarize_reads_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(ROOT / "configs/experiments/quickstart.yaml")
    for seed in (1, 2):
        main(
            [
                "run",
                "--config",
                config,
                "--config",
                TINY,
                "--out",
                str(tmp_path / str(seed)),
                "--seed_everything",
                str(seed),
            ]
        )
    capsys.readouterr()
    assert main(["summarize", str(tmp_path / "1"), str(tmp_path / "2")]) == 0
    table = capsys.readouterr().out
    assert "avg_incremental_acc" in table and table.count("simplecil") == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--method.init_args.nope", "1"], "Option 'nope' is not accepted"),
        (["--trainer.max_epoch", "3"], "unrecognized arguments: --trainer.max_epoch"),
        (["--backbone.nmae", "x"], "unrecognized arguments: --backbone.nmae"),
        (["--stream", "{name: sklearn_digits, incremnt: 2}"], "no option(s) ['incremnt']"),
        (["--stream", "{name: sklearn_digits, order: [0, 1, 2]}"], "must be a permutation"),
        (["--stream", "{name: torchvision_split, dataset: CIFAR100, root: /nonexistent/cifar}"], "/nonexistent/cifar"),
        (["--stream", "{name: image_folder_split, train_root: /nonexistent/a, test_root: /b}"], "/nonexistent/a"),
        (["--method.class_path", "methods.Nope"], "methods.simplecil.SimpleCIL"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    override: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(ROOT / "configs/experiments/quickstart.yaml")
    out = tmp_path / "run"
    code = main(["run", "--config", config, "--config", TINY, "--out", str(out), *override])
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert expected in error[-1] and error[-1].startswith("cil run: error:")
    assert not out.exists()


def _cli(*args: str) -> list[str]:
    config = str(ROOT / "configs/experiments/quickstart_finetune.yaml")
    stream = "{name: sklearn_digits, increment: 1, train_per_class: 20, test_per_class: 10}"
    command = [sys.executable, "-m", "cil.cli", "run", "--config", config, "--config", TINY, "--stream", stream]
    return [*command, "--method.init_args.optimizer", "adamw", "--method.init_args.lr", "0.003", *args]


def test_sigkill_then_resume_gives_identical_results(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = tmp_path / "reference"
    subprocess.run(_cli("--out", str(reference)), check=True, env=env, cwd=ROOT, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _cli("--out", str(killed)), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "task_002.ckpt").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = pd.read_csv(killed / "results.csv")["train_task"].max()
    assert 2 <= finished < 9  # killed mid-stream, finished tasks kept

    subprocess.run(_cli("--out", str(killed), "--resume", "true"), check=True, env=env, cwd=ROOT, capture_output=True)
    pd.testing.assert_frame_equal(pd.read_csv(killed / "results.csv"), pd.read_csv(reference / "results.csv"))
