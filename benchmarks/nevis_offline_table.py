"""SimpleCIL and sequential fine-tuning over the offline NEVIS-style stream, under both protocols.

    python benchmarks/nevis_offline_table.py [--out runs/nevis_offline_bench] [--rows ...]

Stream and backbone: configs/experiments/nevis_offline.yaml (UCI digits, MNIST, font glyphs, Fashion-MNIST,
Animal-MNIST; 60 train / 30 test images per class; EfficientNet-Lite0 from PyPI at 128 px). Fine-tuning trains the
whole network with SGD at lr 0.01 for 2 epochs per task. Each row is a fresh `cil run`. Prints two markdown tables:
the headline metrics (NEVIS's average error: the error on each task right after learning it; the final average
error over tasks; forgetting; cumulative training FLOPs counted by torch.utils.flop_counter) and the final score
of every task.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from _runs import fresh_run  # benchmarks/ is on sys.path when a script in it runs

CONFIG = "configs/experiments/nevis_offline.yaml"
FINETUNE = ["--method", "methods.Finetune", "--method.init_args.lr", "0.01", "--trainer.max_epochs", "2"]
ROWS: dict[str, list[str]] = {
    "simplecil/task_incremental": ["--protocol", "task_incremental"],
    "simplecil/class_incremental": ["--protocol", "class_incremental"],
    "finetune/task_incremental": [*FINETUNE, "--protocol", "task_incremental"],
    "finetune/class_incremental": [*FINETUNE, "--protocol", "class_incremental"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/nevis_offline_bench")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    options = parser.parse_args()
    headline = [
        "| method / protocol | avg error (%) | final avg error (%) | A_last (%) | forgetting | train GFLOPs "
        "| trainable params | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    final_scores = {}
    for name in options.rows:
        out = Path(options.out) / name.replace("/", "_")
        summary, _ = fresh_run(CONFIG, ROWS[name], out)
        headline.append(
            f"| {name} | {summary['avg_error']:.2f} | {summary['final_avg_error']:.2f} | {summary['last_acc']:.2f} "
            f"| {summary['avg_forgetting']:.2f} | {summary['train_flops'] / 1e9:,.0f} "
            f"| {summary['trainable_params']:,} | {summary['wall_s']:.1f} |"
        )
        print(headline[-1], file=sys.stderr, flush=True)
        results = pd.read_csv(out / "results.csv")
        last = results[results["train_task"] == results["train_task"].max()]
        final_scores[name] = dict(zip(last["eval_task_name"], last["accuracy"], strict=True))
    per_task = pd.DataFrame(final_scores).T.round(2)
    per_task.index.name = "final score (%) after the last task"
    print("\n".join(headline))
    print()
    print(per_task.to_markdown())


if __name__ == "__main__":
    main()
