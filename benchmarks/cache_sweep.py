"""What the persistent feature cache saves: a seed sweep of SimpleCIL against one seed, each a fresh `cil run`.

Rows (wall time of the whole process, start-up included; each row from an empty output folder):

* ``one seed``: ``cil run --config CONFIG --seed_everything S0``, no cache;
* ``N seeds, cache``: ``cil run --config CONFIG --seeds S0 .. --feature_cache DIR`` with DIR empty at the start,
  so the first seed fills it and the others read it (their class orders differ: every task holds other images);
* ``N seeds, no cache`` (``--without_cache``): the same sweep embedding every image in every seed.

The ratio of the cached sweep to one seed is the figure #22 asks for (at most 1.3 for three seeds). The script
also checks that every seed's summary is the same with and without the cache where both ran.

    python benchmarks/cache_sweep.py                       # quickstart: Animal-MNIST B0-Inc2, EfficientNet-Lite0
    python benchmarks/cache_sweep.py --without_cache --seeds 1993 1994 1995
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/experiments/quickstart.yaml")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1993, 1994, 1995])
    parser.add_argument("--out", type=Path, default=Path("runs/cache_sweep"))
    parser.add_argument("--without_cache", action="store_true", help="also time the sweep without the cache")
    options = parser.parse_args()
    shutil.rmtree(options.out, ignore_errors=True)
    base = ["cil", "run", "--config", options.config, "--trainer.enable_progress_bar", "false"]
    seeds = [str(seed) for seed in options.seeds]
    load = os.getloadavg()[0]
    rows = {"one seed": timed([*base, "--out", str(options.out / "one"), "--seed_everything", seeds[0]])}
    cache = options.out / "feature_cache"
    cached = [*base, "--out", str(options.out / "cached"), "--seeds", *seeds, "--feature_cache", str(cache)]
    rows[f"{len(seeds)} seeds, cache"] = timed(cached)
    if options.without_cache:
        rows[f"{len(seeds)} seeds, no cache"] = timed([*base, "--out", str(options.out / "plain"), "--seeds", *seeds])
        for seed in seeds:
            with_cache = json.loads((options.out / "cached" / f"seed_{seed}" / "summary.json").read_text())
            without = json.loads((options.out / "plain" / f"seed_{seed}" / "summary.json").read_text())
            for key in ("avg_incremental_acc", "last_acc", "avg_forgetting"):
                if with_cache[key] != without[key]:
                    raise SystemExit(f"seed {seed}: {key} {with_cache[key]} with the cache, {without[key]} without")
    one = rows["one seed"]
    print(f"{options.config}, seeds {' '.join(seeds)} (load average at start {load:.2f}):")
    print("| run | wall (s) | x one seed |\n|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.1f} | {seconds / one:.2f} |")


if __name__ == "__main__":
    main()
