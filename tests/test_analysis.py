"""Seed sweeps, `cil table`, `cil plot` and the notebooks, on real (tiny) runs made by the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cil.cli import main
from cil.results import load_summaries
from cil.tables import TableSpec, aggregate, render

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny_overrides.yaml")
CONFIGS = {
    "simplecil": ROOT / "configs/experiments/quickstart.yaml",
    "finetune": ROOT / "configs/experiments/quickstart_finetune.yaml",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# Plain SGD at the config's learning rate does not move the tiny random ViT in two epochs; AdamW does.
LEARNS = {
    "finetune": (
        "--method.init_args.optimizer",
        "adamw",
        "--method.init_args.lr",
        "0.003",
        "--trainer.max_epochs",
        "15",
    )
}


def _sweep(config: Path, out: Path, *seeds: int, extra: tuple[str, ...] = ()) -> int:
    args = ["run", "--config", str(config), "--config", TINY, "--out", str(out), "--seeds", *map(str, seeds)]
    return main([*args, *LEARNS.get(config.stem.removeprefix("quickstart_"), ()), *extra])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/{simplecil,finetune}/seed_{1,2}: two methods x two seeds on the tiny stream."""
    root = tmp_path_factory.mktemp("sweep")
    for name, config in CONFIGS.items():
        assert _sweep(config, root / name, 1, 2) == 0
    return root


def _summary(run: Path) -> dict[str, object]:
    return json.loads((run / "summary.json").read_text())


def test_sweep_writes_one_run_per_seed(sweep: Path) -> None:
    for name in CONFIGS:
        for seed in (1, 2):
            summary = _summary(sweep / name / f"seed_{seed}")
            assert summary["seed"] == seed and summary["complete"]
    # the seed changes the class order and the initialisation (a few capped steps may leave equal accuracies)
    runs = [sweep / "finetune" / f"seed_{s}" for s in (1, 2)]
    orders = [[t["class_names"] for t in json.loads((run / "stream.json").read_text())["tasks"]] for run in runs]
    assert orders[0] != orders[1]
    heads = [torch.load(run / "checkpoints" / "task_001.ckpt", weights_only=True)["method"] for run in runs]
    assert not torch.equal(heads[0]["weights"]["head.weight"], heads[1]["weights"]["head.weight"])


def test_sweep_skips_finished_seeds_and_runs_new_ones(tmp_path: Path) -> None:
    out = tmp_path / "simplecil"
    assert _sweep(CONFIGS["simplecil"], out, 1) == 0
    finished = (out / "seed_1" / "results.csv").stat().st_mtime_ns
    assert _sweep(CONFIGS["simplecil"], out, 1, 3) == 0
    assert (out / "seed_1" / "results.csv").stat().st_mtime_ns == finished
    assert _summary(out / "seed_3")["complete"]


def test_sweep_resumes_an_interrupted_seed(tmp_path: Path) -> None:
    out = tmp_path / "finetune"
    assert _sweep(CONFIGS["finetune"], out, 5) == 0
    reference = pd.read_csv(out / "seed_5" / "results.csv")
    run = out / "seed_5"  # pretend it was killed after the first task: drop the last task's files
    (run / "checkpoints" / "task_001.ckpt").unlink()
    (run / "summary.json").write_text(json.dumps({**_summary(run), "complete": False}))
    assert _sweep(CONFIGS["finetune"], out, 5) == 0
    pd.testing.assert_frame_equal(pd.read_csv(run / "results.csv"), reference)


@pytest.mark.parametrize("bad", [["--seeds"], ["--seeds", "1", "1"], ["--seeds", "x"]])
def test_bad_seeds_are_one_line(bad: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--config", str(CONFIGS["simplecil"]), "--config", TINY, "--out", str(tmp_path / "r"), *bad])
    assert code == 1 and "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_same_seed_twice_gives_identical_results_csv(tmp_path: Path) -> None:
    for out in ("a", "b"):
        args = ["run", "--config", str(CONFIGS["finetune"]), "--config", TINY, "--out", str(tmp_path / out)]
        assert main([*args, *LEARNS["finetune"], "--seed_everything", "7"]) == 0
    assert (tmp_path / "a" / "results.csv").read_bytes() == (tmp_path / "b" / "results.csv").read_bytes()


def test_table_prints_mean_std_over_seeds_and_bolds_the_best(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["table", str(sweep), "--metrics", "avg_incremental_acc", "last_acc", "avg_forgetting"]) == 0
    printed = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("|")}
    assert {"simplecil", "finetune"} <= set(lines)
    values = [_summary(sweep / "simplecil" / f"seed_{s}")["avg_incremental_acc"] for s in (1, 2)]
    assert f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" in lines["simplecil"]
    assert "sklearn_digits Ā" in printed and lines["simplecil"].rstrip(" |").endswith("2")  # seeds column
    for column in range(3):  # exactly one bold cell per column (the two methods never tie here)
        cells = [line.split("|")[2 + column] for name, line in lines.items() if name in CONFIGS]
        assert sum("**" in cell for cell in cells) == 1


def test_table_formats(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["table", str(sweep), "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert r"\toprule" in latex and r"$\pm$" in latex and r"\textbf{" in latex and "simplecil" in latex
    assert main(["table", str(sweep), "--format", "csv", "--rows", "method", "seed", "--cols"]) == 0
    frame = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert len(frame) == 2 * 2 * 2 and set(frame["n"]) == {1}  # method x seed x metric, one run each


def test_table_rows_by_config_key_and_unknown_key(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["table", str(sweep), "--rows", "config.method.class_path", "--cols"]) == 0
    assert "methods.Finetune" in capsys.readouterr().out
    assert main(["table", str(sweep), "--rows", "nope"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("cil table: error: no column 'nope'") and "\n" not in error


def test_table_compare_paper_puts_the_reported_numbers_under_ours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reported = "{source: 'Some paper, Table 1', avg_incremental_acc: 12.34, last_acc: 5.6}"
    assert _sweep(CONFIGS["simplecil"], tmp_path / "s", 1, extra=("--reported", reported)) == 0
    capsys.readouterr()
    assert main(["table", str(tmp_path), "--compare-paper"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "simplecil" in line]
    assert len(rows) == 2 and "| cil " in rows[0] and "| paper " in rows[1] and "12.34" in rows[1]


def test_best_cell_depends_on_the_metric_direction() -> None:
    summaries = pd.DataFrame(
        {
            "method": ["a", "a", "b", "b"],
            "stream": ["s"] * 4,
            "avg_incremental_acc": [80.0, 82.0, 70.0, 71.0],
            "avg_forgetting": [10.0, 12.0, 3.0, 5.0],
        }
    )
    spec = TableSpec(metrics=("avg_incremental_acc", "avg_forgetting"))
    stats = aggregate(summaries, spec)
    assert stats.loc[stats["method"] == "a", "mean"].tolist() == [81.0, 11.0]
    table = render(stats, spec).splitlines()
    assert "**81.00 ± 1.41**" in table[2] and "**4.00 ± 1.41**" in table[3]
    assert "**" not in table[2].split("|")[3] and "**" not in table[3].split("|")[2]


@pytest.mark.parametrize("kind", ["overview", "seen", "forgetting", "heatmap", "old_new"])
def test_plot_writes_an_image(kind: str, sweep: Path, tmp_path: Path) -> None:
    figure = tmp_path / f"{kind}.png"
    assert main(["plot", str(sweep), "--kind", kind, "--out", str(figure)]) == 0
    assert figure.read_bytes()[:8] == PNG_MAGIC


def test_summaries_carry_the_config(sweep: Path) -> None:
    summaries = load_summaries([sweep], with_config=True)
    assert set(summaries["config.seed_everything"]) == {1, 2}
    assert len(summaries) == 4 and summaries["complete"].all()


@pytest.mark.slow
@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_runs_headless(notebook: Path, sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbclient  # dev dependencies: a missing one fails the test instead of skipping the notebooks
    import nbformat

    stored = nbformat.read(notebook, as_version=4)
    assert all(not cell.get("outputs") for cell in stored.cells), "store notebooks without outputs"
    monkeypatch.setenv("CIL_RUNS", str(sweep))
    monkeypatch.setenv("CIL_FIGURES", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        stored, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}
    )
    client.execute()
    if notebook.name == "forgetting_curves.ipynb":
        for name in ("forgetting_curves.png", "seen_accuracy.png", "old_new.png"):
            assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    else:
        shown = [o for cell in stored.cells for o in cell.get("outputs", []) if "text/markdown" in o.get("data", {})]
        assert shown and "simplecil" in shown[0]["data"]["text/markdown"]


def test_table_refuses_to_average_runs_that_differ_in_more_than_the_seed() -> None:
    summaries = pd.DataFrame(
        {
            "method": ["mos", "mos"],
            "stream": ["s", "s"],
            "seed": [1, 2],
            "avg_incremental_acc": [80.0, 70.0],
            "config.seed_everything": [1, 2],
            "config.method.init_args.merge_momentum": [0.1, 0.0],
        }
    )
    with pytest.raises(ValueError, match=r"differ in config\.method\.init_args\.merge_momentum"):
        aggregate(summaries, TableSpec(metrics=("avg_incremental_acc",)))
    spec = TableSpec(rows=("method", "config.method.init_args.merge_momentum"), metrics=("avg_incremental_acc",))
    assert len(aggregate(summaries, spec)) == 2  # one cell per setting once the key is a row
    twice = summaries.assign(seed=1, run=["runs/b", "runs/a"]).drop(columns="config.method.init_args.merge_momentum")
    with pytest.raises(ValueError, match="repeat seed 1: runs/a and runs/b; pass only one of them"):
        aggregate(twice, TableSpec(metrics=("avg_incremental_acc",)))
    kept = aggregate(twice, TableSpec(metrics=("avg_incremental_acc",)), one_per_seed=True)
    assert kept["n"].tolist() == [1] and kept["mean"].tolist() == [70.0]  # runs/a, the first by directory


def test_table_keeps_the_decimals_and_orders_columns_by_group() -> None:
    summaries = pd.DataFrame(
        {
            "method": ["a", "b", "a", "b"],
            "stream": ["x", "x", "y", "y"],
            "avg_incremental_acc": [80.0, 70.0, 60.0, 65.0],
            "last_acc": [75.0, 60.0, 50.0, 55.0],
        }
    )
    spec = TableSpec(metrics=("avg_incremental_acc", "last_acc"))
    header, _, first, _ = render(aggregate(summaries, spec), spec).splitlines()
    assert [c.strip() for c in header.split("|")[2:6]] == ["x Ā", "x A_last", "y Ā", "y A_last"]
    assert "**80.00**" in first and "60.00" in first


def test_seeds_option_parsing() -> None:
    from cil.cli import _pop_seeds

    assert _pop_seeds(["--seeds", "1", "2,3", "-c", "x.yaml"]) == ([1, 2, 3], ["-c", "x.yaml"])
    assert _pop_seeds(["--seeds=4,5", "--out", "o"]) == ([4, 5], ["--out", "o"])
    with pytest.raises(ValueError, match="no seed"):
        _pop_seeds(["--seeds="])
