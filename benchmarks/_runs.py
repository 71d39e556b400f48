"""Shared by the benchmark scripts: one fresh `cil run` process per table row."""

from __future__ import annotations

import json
import shutil
import subprocess
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
