"""FPF and k-FPF next to fine-tuning and every-step replay (ER), on a CNN and a ViT; prints markdown tables and the
module-sensitivity ranking of each backbone.

    python benchmarks/fpf_table.py [--backbones effnet vit] [--rows finetune er fpf kfpf5 ...] [--out runs/fpf_bench]

Stream: Animal-MNIST B0-Inc2 (5 tasks), class-incremental. Backbones and budgets:

* effnet: configs/experiments/kfpf_offline.yaml, ImageNet EfficientNet-Lite0 at 64 px, 100 train / 50 test
  images per class, 10 epochs per task, buffer 200 images (20 % of the stream), FPF runs of 50 steps x 16 images;
* vit: configs/experiments/kfpf_vit_offline.yaml, the DINOv2-derived ViT-S/14 at 84 px, 40 train / 30 test images
  per class, 6 epochs per task (AdamW, backbone lr 1e-5, head lr 0.01), buffer 80 images (20 %), FPF runs of 30
  steps x 16 images at lr 0.001.

Rows (each a fresh `cil run`, same seed, same buffer size within a backbone; task training: effnet SGD lr 0.01,
momentum 0.9, vit AdamW as above; cosine over each task):

* finetune: the whole network, no replay (the run also records the module sensitivity, cil.sensitivity);
* er: every step adds 32 buffer images to the 32 current ones;
* fpf: fine-tuning + FPF after every task (the config's modules and steps, SGD lr 0.01, momentum 0.9);
* kfpf5 / kfpf10: k-FPF-SGD with k = 5 / 10 FPF runs over the stream, no replay otherwise;
* kfpf5_kd: k-FPF-KD, k = 5, distillation weight 0.5.

Ablation rows (``--rows ...``): k-FPF (k = 5) finetuning only the head, norms + head, the 10 units its own run
ranks most sensitive (``top:10``), or every unit; and ER / k-FPF with a 50-image buffer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from _runs import fresh_run  # benchmarks/ is on sys.path when a script in it runs

CONFIGS = {"effnet": "configs/experiments/kfpf_offline.yaml", "vit": "configs/experiments/kfpf_vit_offline.yaml"}
SENSITIVITY = ["--trainer.callbacks", "[{class_path: cil.sensitivity.SensitivityRecorder}]"]
ROWS: dict[str, list[str]] = {
    "finetune": ["--method", "methods.Finetune", *SENSITIVITY],
    "er": ["--method", "methods.ER"],
    "fpf": ["--method", "methods.FPF"],  # + the task optimiser of the backbone's config, see WRAPPED
    "kfpf5": ["--method.init_args.k", "5"],
    "kfpf10": ["--method.init_args.k", "10"],
    "kfpf5_kd": ["--method.init_args.k", "5", "--method.init_args.variant", "kd"],
    # ablations (not run by default): which modules FPF finetunes, and the buffer size
    "kfpf5_head": ["--method.init_args.modules", "[head]"],
    "kfpf5_norm_head": ["--method.init_args.modules", "[norm, head]"],
    "kfpf5_top10": ["--method.init_args.modules", "[top:10]"],
    "kfpf5_all": ["--method.init_args.modules", "[all]"],
    "er_buffer50": ["--method", "methods.ER", "--method.init_args.buffer_size", "50"],
    "kfpf5_buffer50": ["--method.init_args.buffer_size", "50"],
}
# FPF wraps finetune: the config's task-training arguments (given to KFPF there) go to the wrapped method.
WRAPPED = {
    "effnet": ["--method.init_args.method_args", "{lr: 0.01}"],
    "vit": ["--method.init_args.method_args", "{optimizer: adamw, lr: 0.00001, head_lr: 0.01, weight_decay: 0.0}"],
}
DEFAULT_ROWS = ["finetune", "er", "fpf", "kfpf5", "kfpf10", "kfpf5_kd"]


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
    lines += [f"| {k} | {int(r.units)} | {r.mean_rank:.1f} | {r.score:.2e} |" for k, r in kinds.iterrows()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/fpf_bench")
    parser.add_argument("--backbones", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, choices=list(ROWS))
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
            overrides = ROWS[name] + (WRAPPED[backbone] if name == "fpf" else [])
            summary, _ = fresh_run(CONFIGS[backbone], overrides, out)
            tasks = pd.read_csv(out / "tasks.csv")
            rows[name] = (summary, f"{int(tasks['fpf_params'].max()):,}" if "fpf_params" in tasks else "-")
            print(f"{backbone}/{name}: {summary['last_acc']:.2f} last, {summary['wall_s']:.0f} s", file=sys.stderr)
        er_summary = Path(options.out) / backbone / "er" / "summary.json"  # this run's or an earlier one's
        er_flops = json.loads(er_summary.read_text())["train_flops"] if er_summary.exists() else None
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
