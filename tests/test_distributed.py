"""Two processes give the one-process answer: ``cil run`` under Lightning's DDP on the CPU (gloo), per method family.

Each run is a real ``cil run --trainer.strategy ddp --trainer.devices 2`` (Lightning starts the second process), on
the tiny stream. What must hold (issue: distributed runs):

- every test image is scored once (``n_test`` is the full test set), and the run directory has one writer (one
  summary printed; the engine checks after every task that both ranks hold the same method state and records its
  digest in ``tasks.csv``);
- a method that does not train (SimpleCIL) gives the one-process run's results and bit-identical state;
- a method that trains gives, in ``results.csv``, what one process computes from its final checkpoint.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

import cil
from cil._distributed import state_digest
from cil.data import DataConfig
from tests.conftest import cpu_trainers

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny_overrides.yaml")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
FINETUNE = ["--config", str(ROOT / "configs/experiments/quickstart_finetune.yaml")]
FAMILIES: dict[str, list[str]] = {
    "simplecil": ["--config", str(ROOT / "configs/experiments/quickstart.yaml")],
    "finetune": FINETUNE,
    "mos": [
        "--config",
        str(ROOT / "configs/experiments/mos_offline.yaml"),
        "--method.init_args.statistics_adapter",
        "task",
    ],
    "lae": ["--config", str(ROOT / "configs/experiments/lae_offline.yaml")],
    "er": [*FINETUNE, "--method", "er"],
    "fpf": [*FINETUNE, "--method", "fpf"],  # FPF's consolidation fit on the buffer after every task
    "kfpf": ["--config", str(ROOT / "configs/experiments/kfpf_offline.yaml")],  # FPF's steps inside the fit
    "aper": ["--config", str(ROOT / "configs/experiments/aper_ssf_offline.yaml")],  # prototypes of a tuned copy
    "codyra": ["--config", str(ROOT / "configs/experiments/codyra_offline.yaml")],
    "ranpac": ["--config", str(ROOT / "configs/experiments/ranpac_offline.yaml")],  # lambda's permutation, the solve
    "fecam": ["--config", str(ROOT / "configs/experiments/fecam_offline.yaml")],
    "ease": ["--config", str(ROOT / "configs/experiments/ease_offline.yaml")],  # a subspace per task
    "slca": ["--config", str(ROOT / "configs/experiments/slca_offline.yaml")],  # alignment's draws
    # MTIL: the zero-shot baseline and the tasks not trained yet, scored by a tiny random CLIP's class names
    "codyra_mtil": ["--config", str(ROOT / "configs/paper/codyra_mtil.yaml")],
}
AFTER_TINY = {
    "codyra_mtil": ["--config", str(ROOT / "tests" / "data" / "tiny_clip_overrides.yaml")],
    "ranpac": ["--config", str(ROOT / "tests" / "data" / "tiny_ranpac_overrides.yaml")],
}


def _cil_run(out: Path, family: str, processes: int) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cil.cli", "run", *FAMILIES[family], "--config", TINY, *AFTER_TINY.get(family, [])]
    command += ["--out", str(out)]
    if processes > 1:
        command += ["--trainer.strategy", "ddp", "--trainer.devices", str(processes)]
    done = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _restored(run: Path, copy: Path) -> tuple[cil.Engine, cil.CILMethod]:
    """A one-process engine holding the run's final checkpoint (nothing retrained)."""
    config: dict[str, Any] = yaml.safe_load((run / "config.yaml").read_text())
    cil.list_methods()
    module, _, name = str(config["method"]["class_path"]).rpartition(".")
    method_class = getattr(importlib.import_module(module), name)
    init_args = {k: v for k, v in (config["method"].get("init_args") or {}).items() if k != "backbone"}
    method = method_class(backbone=cil.Backbone(**config["backbone"]), **init_args)
    stream = cil.build_stream(config["stream"], seed=int(config["seed_everything"]))
    copy.mkdir()
    for checkpoint in sorted((run / "checkpoints").glob("task_*.ckpt"))[-1:]:
        (copy / "checkpoints").mkdir()
        (copy / "checkpoints" / checkpoint.name).write_bytes(checkpoint.read_bytes())
    engine = cil.Engine(
        method,
        stream,
        copy,
        trainer_factory=cpu_trainers(copy),
        data=DataConfig(**config["data"]),
        seed=int(config["seed_everything"]),
        config=config,
        resume=True,
        protocol=str(config.get("protocol", "class_incremental")),
        evaluate_future=bool(config.get("evaluate_future", False)),
        label_space=str(config.get("label_space", "seen")),
    )
    assert engine._restore() == len(stream)
    return engine, method


def _one_process_evaluation(run: Path, copy: Path) -> list[float]:
    engine, _ = _restored(run, copy)
    trainer = engine.trainer_factory(len(engine.stream) - 1, [], {"logger": False})
    engine.features.trainer = trainer
    rows = engine._evaluate(trainer, len(engine.stream) - 1, engine.stream.tasks)
    return [row["accuracy"] for row in rows]


def _check_two_process_run(run: Path, done: subprocess.CompletedProcess[str]) -> pd.DataFrame:
    assert done.stdout.count("Summary:") == 1  # one process reports
    results = pd.read_csv(run / "results.csv")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (results["n_test"] == config["stream"]["test_per_class"] * config["stream"]["increment"]).all()
    tasks = pd.read_csv(run / "tasks.csv")
    assert tasks["state_digest"].str.fullmatch("[0-9a-f]{64}").all()  # both ranks agreed after every task
    return results


def test_simplecil_on_two_processes_is_the_one_process_run(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _cil_run(one, "simplecil", 1)
    results = _check_two_process_run(two, _cil_run(two, "simplecil", 2))
    pd.testing.assert_frame_equal(results, pd.read_csv(one / "results.csv"))
    _, method = _restored(one, tmp_path / "restored")
    assert pd.read_csv(two / "tasks.csv")["state_digest"].iloc[-1] == state_digest(method)  # prototypes, bit for bit


@pytest.mark.parametrize(
    "family", ["finetune", "mos", "lae", "er", "fpf", "kfpf", "aper", "codyra", "ranpac", "fecam", "ease", "slca"]
)
def test_a_training_method_on_two_processes_scores_what_its_checkpoint_scores(family: str, tmp_path: Path) -> None:
    run = tmp_path / "two"
    results = _check_two_process_run(run, _cil_run(run, family, 2))
    last = results[results["train_task"] == results["train_task"].max()].sort_values("eval_task")
    expected = _one_process_evaluation(run, tmp_path / "restored")
    assert last["accuracy"].tolist() == pytest.approx(expected, abs=1e-6)
    tasks = pd.read_csv(run / "tasks.csv")
    if family == "lae":  # its own counts of the ensemble's right answers, summed over both ranks' shards
        assert tasks["ensemble_acc"].iloc[-1] == pytest.approx(100 * last["n_correct"].sum() / last["n_test"].sum())
    if family == "finetune":  # 2 epochs of 100 images, counted on both ranks (each trained on 50 per epoch)
        assert tasks["train_images"].tolist() == [200, 200]


def test_scoring_the_future_on_two_processes(tmp_path: Path) -> None:
    """The baseline (the untrained CLIP, the same on both runs) is the one-process baseline, every future score
    covers the whole test set once, and the last row is what one process scores from the final checkpoint."""
    one, two = tmp_path / "one", tmp_path / "two"
    _cil_run(one, "codyra_mtil", 1)
    results = _check_two_process_run(two, _cil_run(two, "codyra_mtil", 2))
    baseline = results[results["train_task"] == -1]
    pd.testing.assert_frame_equal(baseline, pd.read_csv(one / "results.csv").query("train_task == -1"))
    assert len(baseline) == 2 and (results["eval_task"] > results["train_task"]).sum() == 3  # 2 baseline + R[0, 1]
    last = results[results["train_task"] == results["train_task"].max()].sort_values("eval_task")
    assert last["accuracy"].tolist() == pytest.approx(_one_process_evaluation(two, tmp_path / "restored"), abs=1e-6)


def test_a_two_process_run_resumes_from_its_checkpoint_on_both_processes(tmp_path: Path) -> None:
    """Both processes load the newest checkpoint and continue: the same results as the uninterrupted run."""
    run = tmp_path / "two"
    _cil_run(run, "finetune", 2)
    uninterrupted = pd.read_csv(run / "results.csv")
    (run / "checkpoints" / "task_001.ckpt").unlink()  # as if stopped during the last task
    command = [sys.executable, "-m", "cil.cli", "run", *FAMILIES["finetune"], "--config", TINY, "--out", str(run)]
    command += ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--resume", "true"]
    done = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("resuming") == 1  # rank 0 says so, once
    pd.testing.assert_frame_equal(pd.read_csv(run / "results.csv"), uninterrupted)


def test_state_digest_tells_apart_states_that_differ_in_one_bit() -> None:
    module = torch.nn.Linear(3, 2)
    before = state_digest(module)
    with torch.no_grad():
        module.weight.view(-1)[0] = torch.nextafter(module.weight.view(-1)[0], torch.tensor(1.0))
    assert state_digest(module) != before


def _two_ranks(rank: int, store: str, out: str) -> None:
    """One of two gloo processes: broadcast, gather and sum, each rank starting from different values."""
    import torch.distributed as dist

    from cil import _distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # different weights on each rank
        module = torch.nn.Linear(3, 2)
        before = state_digest(module)
        after = _distributed.broadcast_state(module)
        rows = _distributed._gather_rows(torch.full((3 - rank, 2), float(rank)))  # 3 rows on rank 0, 2 on rank 1
        counts = _distributed.sum_counts_over_ranks(torch.tensor([rank + 1, 10]), torch.device("cpu"))
        torch.save({"before": before, "after": after, "rows": rows, "counts": counts}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_broadcast_gather_and_sum_across_two_processes(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_two_ranks, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    zero, one = (torch.load(tmp_path / f"out.{rank}", weights_only=True) for rank in (0, 1))
    assert zero["before"] != one["before"]  # the ranks started apart ...
    assert zero["after"] == one["after"] == zero["before"]  # ... and hold rank 0's state after the broadcast
    expected_rows = torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 2)  # rank order, padding removed
    for result in (zero, one):
        assert torch.equal(result["rows"], expected_rows)
        assert result["counts"].tolist() == [3, 20]
