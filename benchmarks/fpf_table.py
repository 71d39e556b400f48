"""FPF and k-FPF next to fine-tuning and every-step replay (ER), on a CNN and a ViT; prints markdown tables and the
module-sensitivity ranking of each backbone.

    python benchmarks/fpf_table.py [--backbones effnet vit] [--rows finetune er fpf kfpf5 ...] [--out runs/fpf_bench]

Stream: Animal-MNIST B0-Inc2 (5 tasks), class-incremental. Backbones and budgets:

* effnet: configs/experiments/kfpf_offline.yaml, ImageNet EfficientNet-Lite0 at 96 px, 100 train / 50 test
  images per class, 4 epochs per task, buffer 200 images (20 % of the stream);
* vit: configs/experiments/kfpf_vit_offline.yaml, the DINOv2-derived ViT-S/14 at 112 px, 40 train / 30 test images
  per class, 4 epochs per task, buffer 80 images (20 %).

Rows (each a fresh `cil run`, same seed, same buffer size within a backbone; SGD lr 0.01, momentum 0.9, cosine):

* finetune: the whole network, no replay (the run also records the module sensitivity, cil.sensitivity);
* er: every step adds 32 buffer images to the 32 current ones;
* fpf: fine-tuning + FPF after every task (the modules of the config, 10 SGD steps of 32 buffer images, lr 0.01);
* kfpf5 / kfpf10: k-FPF-SGD with k = 5 / 10 FPF runs over the stream, no replay otherwise;
* kfpf5_kd: k-FPF-KD, k = 5, distillation weight 0.5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from _runs import fresh_run  # benchmarks/ is on sys.path when a script in it runs

CONFIGS = {"effnet": "configs/experiments/kfpf_offline.yaml", "vit": "configs/experiments/kfpf_vit_offline.yaml"}
SENSITIVITY = ["--trainer.callbacks", "[{class_path: cil.sensitivity.SensitivityRecorder}]"]
ROWS: dict[str, list[str]] = {
    "finetune": ["--method", "methods.Finetune", *SENSITIVITY],
    "er": ["--method", "methods.ER"],
    "fpf": ["--method", "methods.FPF"],
    "kfpf5": ["--method.init_args.k", "5"],
    "kfpf10": ["--method.init_args.k", "10"],
    "kfpf5_kd": ["--method.init_args.k", "5", "--method.init_args.variant", "kd"],
}


def sensitivity_lines(ranking: pd.DataFrame, top: int = 10) -> list[str]:
    """The first units of the ranking, and where each kind of unit ranks on average."""
    lines = [
        "| rank | unit | kind | params | score (mean L1 change / param / epoch) | boundary ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in ranking.head(top).itertuples():
        lines.append(
            f"| {row.rank} | `{row.unit}` | {row.kind} | {row.params:,} | {row.score:.2e} | {row.boundary_ratio:.2f} |"
        )
    kinds = ranking.groupby("kind").agg(units=("unit", "size"), mean_rank=("rank", "mean"), score=("score", "median"))
    kinds = kinds.sort_values("mean_rank")
    lines += ["", "| kind | units | mean rank | median score |", "|---|---|---|---|"]
    lines += [f"| {k} | {r.units} | {r.mean_rank:.1f} | {r.score:.2e} |" for k, r in kinds.iterrows()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/fpf_bench")
    parser.add_argument("--backbones", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    options = parser.parse_args()
    report: list[str] = []
    for backbone in options.backbones:
        lines = [
            f"**{backbone}** ({CONFIGS[backbone]})",
            "",
            "| row | A-bar (%) | A_last (%) | forgetting | train GFLOPs | FLOPs / ER's | params trained per task "
            "| params FPF trains | wall (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        rows = {}
        for name in options.rows:
            out = Path(options.out) / backbone / name
            summary, _ = fresh_run(CONFIGS[backbone], ROWS[name], out)
            tasks = pd.read_csv(out / "tasks.csv")
            rows[name] = (summary, f"{int(tasks['fpf_params'].max()):,}" if "fpf_params" in tasks else "-")
            print(f"{backbone}/{name}: {summary['last_acc']:.2f} last, {summary['wall_s']:.0f} s", file=sys.stderr)
        er_flops = rows["er"][0]["train_flops"] if "er" in rows else None
        for name, (summary, fpf_params) in rows.items():
            ratio = f"{summary['train_flops'] / er_flops:.2f}" if er_flops else "-"
            lines.append(
                f"| {name} | {summary['avg_incremental_acc']:.2f} | {summary['last_acc']:.2f} "
                f"| {summary['avg_forgetting']:.2f} | {summary['train_flops'] / 1e9:,.0f} | {ratio} "
                f"| {summary['trainable_params']:,} | {fpf_params} | {summary['wall_s']:.1f} |"
            )
        report += [*lines, ""]
        ranking = Path(options.out) / backbone / "finetune" / "sensitivity_rank.csv"
        if ranking.exists():
            report += [f"Module sensitivity under fine-tuning, {backbone} (tasks 1-4):", ""]
            report += [*sensitivity_lines(pd.read_csv(ranking)), ""]
    print("\n".join(report))


if __name__ == "__main__":
    main()
