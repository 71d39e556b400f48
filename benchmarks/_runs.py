"""Shared by the benchmark scripts: one fresh `cil run` process per table row."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def fresh_run(config: str, overrides: list[str], out: Path) -> tuple[dict[str, Any], float]:
    """Runs `cil run --config CONFIG OVERRIDES --out OUT` from scratch; returns its summary and the process's
    wall time in seconds (start-up included)."""
    shutil.rmtree(out, ignore_errors=True)
    command = [
        "cil",
        "run",
        "--config",
        config,
        *overrides,
        "--out",
        str(out),
        "--trainer.enable_progress_bar",
        "false",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    return json.loads((out / "summary.json").read_text()), wall


def method_table(rows: dict[str, tuple[str, list[str]]], names: list[str], out: Path, seed: int | None) -> str:
    """One fresh run per row name (config, overrides), a markdown table of Ā / A_last / forgetting / trainable
    params / train GFLOPs / wall / eval seconds; each row is also printed to stderr when it is done."""
    lines = [
        "| row | A-bar (%) | A_last (%) | forgetting | trainable params | train GFLOPs | wall (s) | eval (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        config, overrides = rows[name]
        if seed is not None:
            overrides = [*overrides, "--seed_everything", str(seed)]
        summary, _ = fresh_run(config, overrides, out / name)
        flops = summary.get("train_flops")
        lines.append(
            f"| {name} | {summary['avg_incremental_acc']:.2f} | {summary['last_acc']:.2f} "
            f"| {summary['avg_forgetting']:.2f} | {summary['trainable_params']:,} "
            f"| {'-' if flops is None else f'{flops / 1e9:,.0f}'} | {summary['wall_s']:.1f} | {summary['eval_s']:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def table_main(
    doc: str, default_out: str, rows: dict[str, tuple[str, list[str]]], extra: dict[str, tuple[str, list[str]]]
) -> None:
    """The command line of a method-table script: ``--out``, ``--rows`` (default: ``rows``; ``extra`` on request),
    ``--seed``; prints :func:`method_table`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--rows", nargs="*", default=list(rows), choices=[*rows, *extra])
    parser.add_argument("--seed", type=int, help="seed_everything for every row (default: the configs', 1993)")
    options = parser.parse_args()
    print(method_table({**rows, **extra}, options.rows, Path(options.out), options.seed))
