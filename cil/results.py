"""The run directory: atomic writers, the long results frame, the summary, and readers for notebooks.

Run directory contract (later tools rely on these names)::

    OUT/config.yaml           resolved config of the run
    OUT/results.csv           one row per (train_task, eval_task): accuracy, n_correct, n_test, ...
    OUT/tasks.csv             one row per trained task: cost (fit / eval seconds, images, parameters)
    OUT/accuracy_matrix.csv   R[i, j] in percent (rows: after training task i, columns: task j)
    OUT/summary.json          the headline metrics, see :func:`summarize`
    OUT/checkpoints/task_{i:03d}.ckpt
    OUT/logs/                 Lightning logger output, one version per task
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cil import metrics

__all__ = [
    "RESULT_COLUMNS",
    "accuracy_matrix",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_runs",
    "load_summaries",
    "summarize",
]

RESULT_COLUMNS = [
    "method",
    "stream",
    "seed",
    "train_task",
    "eval_task",
    "train_task_name",
    "eval_task_name",
    "n_seen_classes",
    "accuracy",
    "n_correct",
    "n_test",
]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` and renames it into place, so readers and crashes
    only ever see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def accuracy_matrix(results: pd.DataFrame, num_tasks: int | None = None) -> np.ndarray:
    """``R [T, T]`` from a results frame of one run; entries that were not evaluated are NaN."""
    size = num_tasks or int(max(results["train_task"].max(), results["eval_task"].max()) + 1)
    matrix = np.full((size, size), np.nan)
    rows = results[["train_task", "eval_task"]].to_numpy(dtype=int)
    matrix[rows[:, 0], rows[:, 1]] = results["accuracy"].to_numpy(dtype=float)
    return matrix


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 4)


def summarize(results: pd.DataFrame, tasks: pd.DataFrame, stream_length: int | None = None) -> dict[str, Any]:
    """Headline metrics of one run (accuracies in percent; JSON null where undefined).

    ``avg_incremental_acc`` and ``last_acc`` are sample-weighted accuracies on all seen classes' test images
    (PILOT's A-bar and A_last); forgetting, BWT and FWT are over tasks, see :mod:`cil.metrics`.
    """
    finished = int(results["train_task"].max()) + 1
    R = accuracy_matrix(results, finished)
    n_test = results.groupby("eval_task")["n_test"].first().reindex(range(finished)).to_numpy(dtype=float)
    seen = metrics.seen_accuracy(R, n_test)
    old, new = metrics.old_new_accuracy(R, n_test)
    fit_s, eval_s = float(tasks["fit_s"].sum()), float(tasks["eval_s"].sum())
    train_images, eval_images = float(tasks["train_images"].sum()), float(tasks["eval_images"].sum())
    baseline = np.full(finished, np.nan)  # accuracy of the untrained model: not measured by class-incremental runs
    return {
        "method": str(results["method"].iloc[0]),
        "stream": str(results["stream"].iloc[0]),
        "seed": int(results["seed"].iloc[0]),
        "finished_tasks": finished,
        "num_tasks": stream_length or finished,
        "complete": stream_length is None or finished == stream_length,
        "avg_incremental_acc": _finite(float(seen.mean())),
        "last_acc": _finite(float(seen[-1])),
        "avg_forgetting": _finite(metrics.avg_forgetting(R)),
        "bwt": _finite(metrics.bwt(R)),
        "fwt": _finite(metrics.fwt(R, baseline)),
        "seen_accuracy": [_finite(v) for v in seen],
        "old_accuracy": [_finite(v) for v in old],
        "new_accuracy": [_finite(v) for v in new],
        "wall_s": round(float(tasks["wall_s"].sum()), 2),
        "fit_s": round(fit_s, 2),
        "eval_s": round(eval_s, 2),
        "train_images_per_s": round(train_images / fit_s, 2) if fit_s > 0 and train_images > 0 else None,
        "eval_images_per_s": round(eval_images / eval_s, 2) if eval_s > 0 else None,
        "trainable_params": int(tasks["trainable_params"].max()),
        "total_params": int(tasks["total_params"].max()),
    }


def _run_dirs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    dirs = []
    for path in map(Path, paths):
        if not (path / "results.csv").is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is not a cil run directory (no results.csv); pass `cil run --out` dirs"
            )
        dirs.append(path)
    return dirs


def load_runs(paths: Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """The long results frames of several runs, stacked, with a ``run`` column naming each run directory."""
    frames = [pd.read_csv(path / "results.csv").assign(run=str(path)) for path in _run_dirs(paths)]
    return pd.concat(frames, ignore_index=True)


def load_summaries(paths: Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """One row per run with its ``summary.json`` (per-step lists dropped) and a ``run`` column."""
    rows = []
    for path in _run_dirs(paths):
        summary = json.loads((path / "summary.json").read_text())
        rows.append({"run": str(path), **{k: v for k, v in summary.items() if not isinstance(v, list)}})
    return pd.DataFrame(rows)
