"""Wall time and images/s of one run on 1 vs N processes (Lightning DDP); prints a markdown table.

    python benchmarks/distributed.py [--processes 2] [--repeats 3] [--accelerator cpu|gpu] [-- extra cil run args]

Each repeat runs ``cil run`` (the config below, or ``--config``) as a fresh process tree, once with one process and
once with ``--trainer.strategy ddp --trainer.devices N``, into temporary run directories, and reads the run's own
``summary.json`` (``wall_s``, ``train_images_per_s``, ``eval_images_per_s``) plus the wall time of the whole command
(start-up and process launch included). The table gives medians over the repeats, their ratio (N processes / 1),
and checks that the two runs scored the same number of test images. The load average is printed: on a shared machine
the wall times grow with it.

Default workload: fine-tuning on Animal-MNIST (B0-Inc5, 60 train / 30 test images per class) with the quickstart's
EfficientNet-Lite0 at 64 px, 2 epochs per task. On a CPU the processes share its cores (gloo), so expect no speed-up
there; the figure that matters is on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = [
    "--config",
    str(ROOT / "configs/experiments/quickstart_finetune.yaml"),
    "--stream",
    "{name: animal_mnist, increment: 5, train_per_class: 60, test_per_class: 30}",
    "--backbone.input_size",
    "64",
    "--trainer.max_epochs",
    "2",
    "--count_flops",
    "false",
]


def _run(out: Path, processes: int, accelerator: str, extra: list[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "cil.cli", "run", *WORKLOAD, *extra, "--out", str(out)]
    command += ["--trainer.accelerator", accelerator, "--trainer.enable_progress_bar", "false"]
    if processes > 1:
        command += ["--trainer.strategy", "ddp", "--trainer.devices", str(processes)]
    else:
        command += ["--trainer.devices", "1"]
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    if done.returncode != 0:
        raise RuntimeError(f"cil run failed on {processes} process(es):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    results = pd.read_csv(out / "results.csv")
    return {
        "command_s": time.perf_counter() - started,
        "run_s": summary["wall_s"],
        "train_images_per_s": summary["train_images_per_s"],
        "eval_images_per_s": summary["eval_images_per_s"],
        "n_test": int(results["n_test"].sum()),
        "avg_incremental_acc": summary["avg_incremental_acc"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("extra", nargs="*", help="more `cil run` arguments (after --)")
    options = parser.parse_args(argv)
    rows: dict[int, list[dict[str, Any]]] = {1: [], options.processes: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(options.repeats):
            for processes in rows:
                out = Path(tmp) / f"p{processes}_r{repeat}"
                rows[processes].append(_run(out, processes, options.accelerator, options.extra))
    print(f"load average: {os.getloadavg()}; {os.cpu_count()} CPUs; accelerator {options.accelerator}\n")
    keys = ["command_s", "run_s", "train_images_per_s", "eval_images_per_s"]
    one, many = ({k: statistics.median(r[k] for r in rows[p]) for k in keys} for p in rows)
    print(f"| medians over {options.repeats} repeats | 1 process | {options.processes} processes | ratio |")
    print("|---|---|---|---|")
    for key in keys:
        print(f"| {key} | {one[key]:.2f} | {many[key]:.2f} | {many[key] / one[key]:.2f} |")
    n_test = {p: {r["n_test"] for r in rows[p]} for p in rows}
    accuracies = {p: [r["avg_incremental_acc"] for r in rows[p]] for p in rows}
    print(f"\nimages scored: {n_test} (must be equal); A-bar per run: {accuracies}")
    return 0 if len(set.union(*n_test.values())) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
