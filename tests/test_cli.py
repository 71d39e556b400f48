"""The `cil` command line: every config parses and runs on the tiny stream, errors are one line, method names,
start-up without torch, SIGKILL / SIGTERM + resume."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cil.cli import main

ROOT = Path(__file__).resolve().parents[1]
# configs/methods/ holds method settings to layer over a config that names the backbone and the stream.
PARTIAL_BASE = ROOT / "configs/experiments/simplecil_vit_offline.yaml"
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _layers(config: Path) -> list[str]:
    partial = config.parent.name == "methods"
    return ["--config", str(PARTIAL_BASE), "--config", str(config)] if partial else ["--config", str(config)]


TINY = str(ROOT / "tests" / "data" / "tiny_overrides.yaml")
TINY_CLIP = str(ROOT / "tests" / "data" / "tiny_clip_overrides.yaml")
TINY_DOMAINS = str(ROOT / "tests" / "data" / "tiny_domain_overrides.yaml")
TINY_BY_METHOD = {
    "methods.CODAPrompt": str(ROOT / "tests" / "data" / "tiny_coda_overrides.yaml"),
    "methods.RanPAC": str(ROOT / "tests" / "data" / "tiny_ranpac_overrides.yaml"),
}
DOMAIN_STREAMS = ("digits_domains",)


def _tiny(config: Path) -> list[str]:
    """The tiny overrides; a CLIP config keeps a tiny random CLIP (its class-name head and zero-shot scoring run),
    a domain-incremental config a tiny domain stream, and a method that needs it its own (TINY_BY_METHOD)."""
    loaded = yaml.safe_load(config.read_text()) or {}
    backbone, stream = (str(loaded.get(group, {}).get("name", "")) for group in ("backbone", "stream"))
    extra = ["--config", TINY_CLIP] if backbone.startswith("open_clip/") else []
    extra += ["--config", TINY_DOMAINS] if stream in DOMAIN_STREAMS else []
    by_method = TINY_BY_METHOD.get(str(loaded.get("method", {}).get("class_path", "")))
    return ["--config", TINY, *extra, *(["--config", by_method] if by_method else [])]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *_layers(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "method:" in printed and "stream:" in printed and "backbone:" in printed


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_runs_on_the_tiny_stream(config: Path, tmp_path: Path) -> None:
    assert main(["run", *_layers(config), *_tiny(config), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and summary["finished_tasks"] == 2
    tiny = "digits_domains" if TINY_DOMAINS in _tiny(config) else "sklearn_digits"
    assert (tmp_path / "config.yaml").read_text().count(f"name: {tiny}") == 1
    if yaml.safe_load(config.read_text()).get("evaluate_future"):  # MTIL / X-TAIL: the full matrix and its numbers
        matrix = pd.read_csv(tmp_path / "accuracy_matrix.csv", index_col=0)
        assert not matrix.isna().any().any()
        assert None not in [summary[k] for k in ("mtil_transfer", "mtil_average", "mtil_last")]
        if TINY_CLIP in _tiny(config):  # scored by class names: the zero-shot baseline too, and so FWT
            assert summary["fwt"] is not None and None not in summary["zero_shot_baseline"]


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
        (["--method.class_path", "methods.Nope"], "unknown method 'methods.Nope'; the registered methods are "),
        (["--method", "simplecl"], "unknown method 'simplecl'; did you mean 'simplecil'?"),
        (["--method.class_path=simplecl"], "did you mean 'simplecil'?"),
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


def test_help_exits_0_and_no_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0 and main(["-h"]) == 0
    assert "cil run --config" in capsys.readouterr().out
    assert main([]) == 2 and main(["nope"]) == 2


def _tiny_run_dir(out: Path) -> Path:
    """A two-task run directory written without training (results.csv, tasks.csv, summary.json, config.yaml)."""
    from cil.results import RESULT_COLUMNS, summarize

    rows = [(0, 0, 90.0), (1, 0, 70.0), (1, 1, 80.0)]
    results = pd.DataFrame(
        [
            {"method": "simplecil", "stream": "tiny", "seed": 1, "protocol": "class_incremental", "train_task": i}
            | {"eval_task": j, "metric": "top1", "accuracy": acc, "n_correct": int(acc / 10), "n_test": 10}
            for i, j, acc in rows
        ],
        columns=RESULT_COLUMNS,
    )
    tasks = pd.DataFrame({"task": [0, 1], "fit_s": 1.0, "eval_s": 1.0, "wall_s": 2.0, "train_images": 10})
    tasks = tasks.assign(eval_images=10, trainable_params=0, total_params=5, train_flops=None)
    out.mkdir(parents=True)
    results.to_csv(out / "results.csv", index=False)
    tasks.to_csv(out / "tasks.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summarize(results, tasks, 2)))
    (out / "config.yaml").write_text("method:\n  class_path: methods.SimpleCIL\nstream: {name: tiny}\n")
    return out


def test_help_and_analysis_commands_do_not_import_torch(tmp_path: Path) -> None:
    """`cil --help`, `cil summarize`, `cil table` and `cil plot` read CSV files: torch, Lightning, timm and the
    methods would cost them 10-30 s of imports (and twice that before the malloc re-exec moved to `cil run`)."""
    run = _tiny_run_dir(tmp_path / "run")
    script = f"""
import sys
import cil, cil.cli, cil.metrics, cil.results
assert cil.cli.main(["--help"]) == 0
assert cil.cli.main(["summarize", {str(run)!r}]) == 0
assert cil.cli.main(["table", {str(run)!r}]) == 0
assert cil.cli.main(["plot", {str(run)!r}, "--out", {str(tmp_path / "plot.png")!r}]) == 0
assert callable(cil.load_runs) and callable(cil.metrics.avg_forgetting)
print("heavy:", sorted(m for m in ("torch", "lightning", "timm", "torchmetrics", "methods") if m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "heavy: []"
    assert "simplecil" in done.stdout and (tmp_path / "plot.png").is_file()


def test_lazy_public_names_are_the_real_objects() -> None:
    import cil
    from cil._task_accuracy import TaskAccuracy
    from cil.engine import Engine
    from cil.metrics import TaskAccuracy as ReExported

    assert cil.Engine is Engine and cil.TaskAccuracy is TaskAccuracy and ReExported is TaskAccuracy
    assert set(cil.__all__) <= set(dir(cil))
    with pytest.raises(AttributeError):
        _ = cil.Nope


def test_registered_method_name_runs_on_the_tiny_stream(tmp_path: Path) -> None:
    config = str(ROOT / "configs/experiments/quickstart_finetune.yaml")
    assert main(["run", "--config", config, "--config", TINY, "--method", "simplecil", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "simplecil" and summary["complete"]
    assert "class_path: methods.SimpleCIL" in (tmp_path / "config.yaml").read_text()


def test_a_run_directory_s_config_runs_again_as_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(ROOT / "configs/experiments/quickstart_finetune.yaml")
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["run", "--config", config, "--config", TINY, "--method", "simplecil", "--out", str(first)]) == 0
    assert "method_name: simplecil" in (first / "config.yaml").read_text()
    assert main(["run", "--config", str(first / "config.yaml"), "--out", str(again)]) == 0
    columns = ["train_task", "eval_task", "accuracy"]
    pd.testing.assert_frame_equal(
        pd.read_csv(again / "results.csv")[columns], pd.read_csv(first / "results.csv")[columns]
    )
    capsys.readouterr()
    other = ["--method", "finetune", "--out", str(tmp_path / "other")]
    assert main(["run", "--config", str(first / "config.yaml"), *other]) == 1
    assert "method_name 'simplecil'" in capsys.readouterr().err and not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    ("method", "class_path"),
    [
        (["--method.class_path", "mos"], "methods.MOS"),
        (["--method=lae_lora"], "methods.LAELoRA"),
        (["--method", "rank_selective_lora"], "methods.CoDyRA"),  # an alias
        (["--method", "{class_path: er, init_args: {buffer_size: 7}}"], "methods.ER"),
        ("method: mos", "methods.MOS"),
        ("method: {class_path: lae_lora, init_args: {lr: 0.5}}", "methods.LAELoRA"),
        (["--method", "SimpleCIL"], "methods.SimpleCIL"),  # class names and class paths as before
        (["--method", "methods.Finetune"], "methods.Finetune"),
    ],
)
def test_registered_method_names_resolve_to_class_paths(
    method: list[str] | str, class_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if isinstance(method, str):  # a YAML layer
        (tmp_path / "method.yaml").write_text(method + "\n")
        method = ["--config", str(tmp_path / "method.yaml")]
    config = str(ROOT / "configs/experiments/quickstart.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", config, "--config", TINY, *method, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"]["class_path"] == class_path
    if "init_args" in str(method):
        assert set(printed["method"]["init_args"].items()) & {("buffer_size", 7), ("lr", 0.5)}


def test_wrong_method_name_in_a_config_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "method.yaml").write_text("method: {class_path: simplecl}\n")
    config = str(ROOT / "configs/experiments/quickstart.yaml")
    out = tmp_path / "run"
    code = main(["run", "--config", config, "--config", str(tmp_path / "method.yaml"), "--out", str(out)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(error) == 1 and not out.exists()
    assert (
        error[0] == f"cil run: error: {tmp_path / 'method.yaml'}: unknown method 'simplecl'; did you mean 'simplecil'?"
    )


def _cli(*args: str) -> list[str]:
    config = str(ROOT / "configs/experiments/quickstart_finetune.yaml")
    stream = "{name: sklearn_digits, increment: 1, train_per_class: 20, test_per_class: 10}"
    command = [sys.executable, "-m", "cil.cli", "run", "--config", config, "--config", TINY, "--stream", stream]
    return [*command, "--method.init_args.optimizer", "adamw", "--method.init_args.lr", "0.003", *args]


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def reference_results(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The results of the uninterrupted run that the interrupted ones must reproduce (run once for the module)."""
    reference = tmp_path_factory.mktemp("reference")
    subprocess.run(_cli("--out", str(reference)), check=True, env=ENV, cwd=ROOT, capture_output=True)
    return pd.read_csv(reference / "results.csv")


def _wait_for(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 240
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_results(tmp_path: Path, reference_results: pd.DataFrame) -> None:
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _cli("--out", str(killed)), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )
    _wait_for(killed / "checkpoints" / "task_002.ckpt", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = pd.read_csv(killed / "results.csv")["train_task"].max()
    assert 2 <= finished < 9  # killed mid-stream, finished tasks kept

    subprocess.run(_cli("--out", str(killed), "--resume", "true"), check=True, env=ENV, cwd=ROOT, capture_output=True)
    pd.testing.assert_frame_equal(pd.read_csv(killed / "results.csv"), reference_results)


@pytest.mark.slow
def test_sigterm_exits_143_with_the_resume_command(tmp_path: Path, reference_results: pd.DataFrame) -> None:
    """SIGTERM (SLURM, `timeout`) mid-task: exit 128 + 15, the unfinished task discarded, one line saying how to
    resume; the printed command continues the run to the results of an uninterrupted one."""
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(
        _cli("--out", str(stopped)), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _wait_for(stopped / "checkpoints" / "task_002.ckpt", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("cil run: stopped by SIGTERM in task ") and "; resume with: cil run " in last
    finished = int(pd.read_csv(stopped / "results.csv")["train_task"].max()) + 1
    assert 3 <= finished < 10
    done = [f"task_{i:03d}" for i in range(finished)]
    assert sorted(p.stem for p in (stopped / "checkpoints").iterdir()) == done
    assert sorted(p.name for p in (stopped / "logs").iterdir()) == done  # the unfinished task's logs are gone
    assert not list(stopped.rglob("*.tmp"))

    command = shlex.split(last.split("; resume with: ", 1)[1])
    assert command[:2] == ["cil", "run"] and command[-4:] == ["--out", str(stopped), "--resume", "true"]
    subprocess.run([sys.executable, "-m", "cil.cli", *command[1:]], check=True, env=ENV, cwd=ROOT, capture_output=True)
    pd.testing.assert_frame_equal(pd.read_csv(stopped / "results.csv"), reference_results)


@pytest.mark.parametrize(
    ("strategy", "method", "says"),
    [
        ("ddp_spawn", "simplecil", "DDP strategy only"),  # spawns per Trainer call: the method would stay behind
        ("ddp_fork", "simplecil", "DDP strategy only"),
        ("ddp", "mos", "statistics_adapter"),  # MOS's default statistics cannot be sharded
        ("ddp", "simplecil --feature_cache", "feature_cache is single-process"),
    ],
)
def test_an_unsupported_distributed_run_is_refused_before_anything_is_written(
    strategy: str, method: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(ROOT / "configs/experiments/quickstart.yaml")
    out = tmp_path / "run"
    distributed = ["--trainer.strategy", strategy, "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    method, *cache = method.split()
    extra = [cache[0], str(tmp_path / "cache")] if cache else []
    arguments = ["run", "--config", config, "--config", TINY, "--method", method, "--out", str(out), *extra]
    code = main([*arguments, *distributed])
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and says in error[-1] and "--trainer.devices 1" in error[-1]
    assert not out.exists() and not (tmp_path / "cache").exists()
