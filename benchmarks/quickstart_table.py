"""Reruns the foundation's offline comparison and prints a markdown table.

    python benchmarks/quickstart_table.py [--out runs/bench] [--ablation]

Rows: SimpleCIL with the pre-trained EfficientNet-Lite0 and with random init, finetune (lower bound) and joint
(upper bound), all on the quickstart stream (Animal-MNIST B0-Inc2, 400 train / 100 test images per class, 128 px).
``--ablation`` adds SimpleCIL at 224 px and on the full data, to show what the quickstart's size choices cost
(``--ablation-only``: just those and the quickstart row).
Every row is a fresh `cil run` process, timed end to end (start-up included).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _runs import fresh_run  # benchmarks/ is on sys.path when a script in it runs

QUICKSTART = "configs/experiments/quickstart.yaml"
ROWS = {
    "simplecil (pre-trained)": [QUICKSTART],
    "simplecil (random init)": [QUICKSTART, "--backbone.offline_weights", "null"],
    "finetune": ["configs/experiments/quickstart_finetune.yaml"],
    "joint": ["configs/experiments/quickstart_joint.yaml"],
}
ABLATION = {
    "simplecil 224 px": [QUICKSTART, "--backbone.input_size", "224"],
    "simplecil all data (800/200 per class)": [
        QUICKSTART,
        "--stream",
        "{name: animal_mnist, increment: 2, train_per_class: null, test_per_class: null}",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--ablation", action="store_true", help="add the resolution / subset rows")
    parser.add_argument("--ablation-only", action="store_true", help="only the quickstart row and the ablation rows")
    options = parser.parse_args()
    rows = {**ROWS, **(ABLATION if options.ablation or options.ablation_only else {})}
    if options.ablation_only:
        rows = {label: args for label, args in rows.items() if label == "simplecil (pre-trained)" or label in ABLATION}
    lines = [
        "| run | A-bar (%) | A_last (%) | forgetting | trainable params | cil run wall (s) | engine wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (label, args) in enumerate(rows.items()):
        s, wall = fresh_run(args[0], args[1:], Path(options.out) / f"row{i}")
        lines.append(
            f"| {label} | {s['avg_incremental_acc']:.2f} | {s['last_acc']:.2f} | {s['avg_forgetting']:.2f} "
            f"| {s['trainable_params']:,} | {wall:.1f} | {s['wall_s']:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
