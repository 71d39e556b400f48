"""The run directory: atomic writers, the long results frame, the summary, and readers for notebooks.

Run directory contract (later tools rely on these names)::

    OUT/config.yaml           resolved config of the run
    OUT/stream.json           the stream as built: tasks, sizes, years, splits, skipped tasks
    OUT/results.csv           one row per (train_task, eval_task): protocol, metric (top1 | map), accuracy (the
                              score, percent), n_correct, n_test, cum_train_flops, ...; with evaluate_future also
                              the tasks not trained yet (eval_task > train_task) and the zero-shot baseline
                              (train_task -1, before the first task)
    OUT/tasks.csv             one row per trained task: cost (fit / eval seconds, images, parameters, train_flops)
    OUT/accuracy_matrix.csv   R[i, j] in percent (rows: after training task i, columns: task j)
    OUT/summary.json          the headline metrics, see :func:`summarize`
    OUT/checkpoints/task_{i:03d}.ckpt
                              the state after task i, with the SHA-256 of its content (:func:`content_sha256`);
                              pre-trained weights still unchanged only as digests (:mod:`cil._unchanged_weights`)
    OUT/logs/                 Lightning logger output, one version per task

Every file is written atomically (:func:`atomic_write_bytes`) with the mode ``open(path, "w")`` would give it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cil import metrics

__all__ = [
    "PER_TASK_METRICS",
    "RESULT_COLUMNS",
    "accuracy_matrix",
    "atomic_write_bytes",
    "atomic_write_text",
    "baseline_accuracy",
    "content_sha256",
    "find_runs",
    "load_runs",
    "load_summaries",
    "selected_ranks",
    "summarize",
]

RESULT_COLUMNS = [
    "method",
    "stream",
    "seed",
    "protocol",
    "train_task",
    "eval_task",
    "train_task_name",
    "eval_task_name",
    "n_seen_classes",
    "metric",
    "accuracy",
    "n_correct",
    "n_test",
    "cum_train_flops",
    "retention_acc",
]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` and renames it into place, so readers and crashes
    only ever see the old or the new file, never half of one. The file gets the mode ``open(path, "w")`` would
    give it (0o666 less the umask), so a group that shares the run directory can read the results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new temporary file beside ``path``, opened for writing. Created with mode 0o666 for the kernel to apply
    the umask, as ``open`` does: ``tempfile.mkstemp`` makes it 0o600, and reading the umask with ``os.umask`` sets
    it for a moment under every other thread. ``O_EXCL`` keeps mkstemp's guarantee that the file is new; its 64
    random bits make a clash with another writer's temporary file (then a FileExistsError) practically impossible.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch  # here, not at the top: the readers below serve the analysis commands, which need no torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def content_sha256(value: Any) -> str:
    """SHA-256 of a checkpoint's content as ``torch.load`` gives it back: every tensor's dtype, shape and bytes,
    and the type and ``repr`` of every other value, walked in order (sets sorted: their order changes per process).

    The engine stores it inside the checkpoint it covers (the ``sha256`` entry) and checks it on resume, because
    ``torch.load`` reads a flipped byte in a tensor's storage without complaint. Inside, not beside: the checkpoint
    stays one file that is written atomically, that ``torch.load`` reads as before and that carries its checksum
    wherever it is copied, so no crash or copy can leave a checkpoint and its checksum disagreeing. The digest
    covers what is loaded, not the file's bytes, so it is the same before ``torch.save`` and after ``torch.load``.
    """
    digest = hashlib.sha256()
    for chunk in _content_chunks(value):
        digest.update(chunk)
    return digest.hexdigest()


def _content_chunks(value: Any) -> Iterator[bytes | memoryview]:
    import torch

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        yield f"tensor {tensor.dtype} {tuple(value.shape)}\n".encode()
        yield tensor.view(torch.uint8).numpy().data  # the raw bytes, not copied
    elif isinstance(value, np.ndarray):
        yield f"ndarray {value.dtype} {value.shape}\n".encode()
        yield np.ascontiguousarray(value).tobytes()
    elif isinstance(value, dict):
        yield f"dict {len(value)}\n".encode()
        for key, item in value.items():
            yield from _content_chunks(key)
            yield from _content_chunks(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        yield f"{type(value).__name__} {len(value)}\n".encode()
        for item in sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value:
            yield from _content_chunks(item)
    else:
        yield f"{type(value).__name__} {value!r}\n".encode()


def accuracy_matrix(results: pd.DataFrame, num_tasks: int | None = None) -> np.ndarray:
    """``R [T, T]`` from a results frame of one run; entries that were not evaluated are NaN. The baseline's rows
    (``train_task`` -1) are not part of it: see :func:`baseline_accuracy`."""
    trained = results[results["train_task"] >= 0]
    size = num_tasks or int(max(trained["train_task"].max(), results["eval_task"].max()) + 1)
    matrix = np.full((size, size), np.nan)
    rows = trained[["train_task", "eval_task"]].to_numpy(dtype=int)
    matrix[rows[:, 0], rows[:, 1]] = trained["accuracy"].to_numpy(dtype=float)
    return matrix


def baseline_accuracy(results: pd.DataFrame, num_tasks: int) -> np.ndarray:
    """Each task's score before the first task was trained (the zero-shot baseline, ``train_task`` -1), ``[T]``;
    NaN where it was not measured (every task, unless the run evaluated the future with a method that scores
    classes by name)."""
    baseline = np.full(num_tasks, np.nan)
    before = results[results["train_task"] < 0]
    baseline[before["eval_task"].to_numpy(dtype=int)] = before["accuracy"].to_numpy(dtype=float)
    return baseline


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 4)


def summarize(
    results: pd.DataFrame,
    tasks: pd.DataFrame,
    stream_length: int | None = None,
    label_space: str = "seen",
    evaluate_future: bool = False,
) -> dict[str, Any]:
    """Headline metrics of one run (accuracies in percent; JSON null where undefined).

    ``avg_incremental_acc`` and ``last_acc`` are sample-weighted accuracies on all seen classes' test images
    (PILOT's A-bar and A_last); forgetting, BWT and FWT are over tasks, see :mod:`cil.metrics`. A multi-label
    task's score is its mean average precision (percent) wherever an accuracy would be.

    NEVIS's headline, ``avg_error``, is the mean over tasks of the error on each task right after training on it
    (``100 - R[j, j]``); ``final_avg_error`` is the same on the last row (after the whole stream), and
    ``final_task_scores`` that row itself. ``train_flops`` sums every task's counted training FLOPs.

    FWT needs R's upper triangle and the zero-shot ``baseline`` (``evaluate_future``), MTIL's ``mtil_transfer`` and
    ``mtil_average`` the full matrix of a finished run: null otherwise. ``mtil_last`` (the last row's unweighted
    mean) exists for every finished run. Per task, in stream order (``task_names``): ``final_task_scores``,
    ``forgetting_per_task`` (null for the last task) and ``mtil_{transfer,average,last}_per_task``.
    """
    trained = results[results["train_task"] >= 0]
    finished = int(trained["train_task"].max()) + 1
    num_tasks = stream_length or finished
    full = accuracy_matrix(results, max(num_tasks, finished))
    R = full[:finished, :finished]
    n_test = trained.groupby("eval_task")["n_test"].first().reindex(range(finished)).to_numpy(dtype=float)
    seen = metrics.seen_accuracy(R, n_test)
    old, new = metrics.old_new_accuracy(R, n_test)
    fit_s, eval_s = float(tasks["fit_s"].sum()), float(tasks["eval_s"].sum())
    train_images, eval_images = float(tasks["train_images"].sum()), float(tasks["eval_images"].sum())
    baseline = baseline_accuracy(results, full.shape[0])  # [T]: every task, trained yet or not
    flops = tasks["train_flops"] if "train_flops" in tasks else pd.Series([None])
    complete = finished == num_tasks
    mtil = full if complete else np.full_like(full, np.nan)  # MTIL's columns need every step
    names = trained.groupby("eval_task")["eval_task_name"].first().reindex(range(finished))
    forgetting = metrics.forgetting_per_task(R)
    return {
        "method": str(results["method"].iloc[0]),
        "stream": str(results["stream"].iloc[0]),
        "seed": int(results["seed"].iloc[0]),
        "protocol": str(results["protocol"].iloc[0]) if "protocol" in results else "class_incremental",
        "label_space": label_space,  # how the run was scored, beside its protocol (cil.transfer)
        "evaluate_future": evaluate_future,
        "finished_tasks": finished,
        "num_tasks": num_tasks,
        "complete": complete,
        "avg_incremental_acc": _finite(float(seen.mean())),
        "last_acc": _finite(float(seen[-1])),
        "avg_forgetting": _finite(metrics.avg_forgetting(R)),
        "bwt": _finite(metrics.bwt(R)),
        "fwt": _finite(metrics.fwt(R, baseline[:finished])),
        "mtil_transfer": _finite(metrics.mtil_transfer(mtil)),
        "mtil_average": _finite(metrics.mtil_average(mtil)),
        "mtil_last": _finite(metrics.mtil_last(mtil)),
        "avg_error": _finite(float(np.mean(100.0 - np.diag(R)))),
        "final_avg_error": _finite(float(np.mean(100.0 - R[-1]))),
        "task_names": [str(name) for name in names],
        "final_task_scores": [_finite(v) for v in R[-1]],
        "forgetting_per_task": [_finite(v) for v in [*forgetting, np.nan]],
        "mtil_transfer_per_task": [_finite(v) for v in metrics.mtil_transfer_per_task(mtil)[:finished]],
        "mtil_average_per_task": [_finite(v) for v in metrics.mtil_average_per_task(mtil)[:finished]],
        "mtil_last_per_task": [_finite(v) for v in metrics.mtil_last_per_task(mtil)[:finished]],
        "zero_shot_baseline": [_finite(v) for v in baseline[:finished]],
        "seen_accuracy": [_finite(v) for v in seen],
        "old_accuracy": [_finite(v) for v in old],
        "new_accuracy": [_finite(v) for v in new],
        "wall_s": round(float(tasks["wall_s"].sum()), 2),
        "fit_s": round(fit_s, 2),
        "eval_s": round(eval_s, 2),
        **({"future_eval_s": round(float(tasks["future_eval_s"].sum()), 2)} if "future_eval_s" in tasks else {}),
        "train_images_per_s": round(train_images / fit_s, 2) if fit_s > 0 and train_images > 0 else None,
        "eval_images_per_s": round(eval_images / eval_s, 2) if eval_s > 0 else None,
        "trainable_params": int(tasks["trainable_params"].max()),  # the peak over tasks
        "total_params": int(tasks["total_params"].max()),
        "train_flops": None if flops.isna().any() else sum(int(v) for v in flops),  # Python ints: no int64 overflow
        **_retention_summary(tasks),
    }


PER_TASK_METRICS: dict[str, tuple[str, str | None]] = {
    "final_accuracy": ("final_task_scores", None),
    "forgetting": ("forgetting_per_task", "avg_forgetting"),
    "mtil_transfer": ("mtil_transfer_per_task", "mtil_transfer"),
    "mtil_average": ("mtil_average_per_task", "mtil_average"),
    "mtil_last": ("mtil_last_per_task", "mtil_last"),
}
"""Per-task metrics of ``summary.json``: ``name -> (its list of one value per task, the summary key of their average,
or None for the plain mean of the list)``; :func:`load_summaries` with ``per_task=True`` gives one row per task and
one ``Average`` row per run."""


def _retention_summary(tasks: pd.DataFrame) -> dict[str, Any]:
    """The retention probe (:mod:`cil.retention`) before the stream, after each task, and its drop."""
    if "retention_acc" not in tasks or "retention_before" not in tasks:
        return {}
    before = float(tasks["retention_before"].iloc[0])
    after = [float(v) for v in tasks["retention_acc"]]
    return {
        "retention_acc_before": round(before, 4),
        "retention_acc": [round(v, 4) for v in after],
        "retention_drop": round(before - after[-1], 4),
    }


def selected_ranks(tasks: pd.DataFrame) -> pd.DataFrame:
    """The rank each LoRA layer kept after each task (CoDyRA's ``rank/<layer>`` columns of ``tasks.csv``), as a
    long frame ``(task, layer, rank)``."""
    columns = [c for c in tasks.columns if c.startswith("rank/")]
    if not columns:
        raise ValueError("tasks.csv has no rank/<layer> columns; only rank-selective methods (codyra) record them")
    long = tasks.melt(id_vars=["task"], value_vars=columns, var_name="layer", value_name="rank")
    long["layer"] = long["layer"].str.removeprefix("rank/")
    return long.astype({"rank": int}).reset_index(drop=True)


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run directories named by ``paths``: each path is a run directory or a folder searched recursively for them
    (a sweep's root, ``runs/``), in sorted order."""
    dirs: list[Path] = []
    for path in map(Path, paths):
        if (path / "results.csv").is_file():
            dirs.append(path)
            continue
        found = sorted(p.parent for p in path.rglob("results.csv")) if path.is_dir() else []
        if not found:
            raise FileNotFoundError(
                f"{str(path)!r} is neither a cil run directory nor a folder holding one (no results.csv); "
                "pass directories written by `cil run --out`"
            )
        dirs.extend(found)
    return list(dict.fromkeys(dirs))


def load_runs(paths: Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """The long results frames of several runs, stacked, with a ``run`` column naming each run directory."""
    frames = [_read_results(path / "results.csv").assign(run=str(path)) for path in find_runs(paths)]
    return pd.concat(frames, ignore_index=True)


_REQUIRED_RESULT_COLUMNS = ("train_task", "eval_task", "accuracy")
_DAMAGED = "restore the file, or resume the run (`cil run ... --resume true` rewrites it from the last checkpoint)"


def _read_results(file: Path) -> pd.DataFrame:
    """``results.csv``, or a one-line error naming the file when it is not a cil results table."""
    try:
        frame = pd.read_csv(file)
    except OSError as error:  # a folder, unreadable
        raise ValueError(f"cannot read {str(file)!r} ({error.strerror or error}); {_DAMAGED}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"cannot read {str(file)!r} as a CSV table ({reason}); {_DAMAGED}") from None
    missing = [column for column in _REQUIRED_RESULT_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"{str(file)!r} is not a cil results table (no column {', '.join(missing)}); {_DAMAGED}")
    return frame


def _read_summary(file: Path) -> dict[str, Any]:
    """``summary.json`` as a dict, or a one-line error naming the file."""
    try:
        summary = json.loads(file.read_text())
    except OSError as error:  # missing, a folder, unreadable
        raise ValueError(f"cannot read {str(file)!r} ({error.strerror or error}); {_DAMAGED}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {str(file)!r} as JSON ({error}); {_DAMAGED}") from None
    if not isinstance(summary, dict):
        raise ValueError(
            f"{str(file)!r} holds a JSON {type(summary).__name__}, not the object of headline metrics cil writes; "
            f"{_DAMAGED}"
        )
    return summary


def _read_config(file: Path) -> dict[str, Any]:
    """A run's ``config.yaml`` as a dict (empty if the file is empty), or a one-line error naming the file."""
    try:
        config = yaml.safe_load(file.read_text())
    except OSError as error:  # a folder, unreadable
        raise ValueError(
            f"cannot read {str(file)!r} ({error.strerror or error}); restore the run's config.yaml"
        ) from None
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"cannot read {str(file)!r} as YAML ({reason}); restore the run's config.yaml") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(
            f"{str(file)!r} holds a YAML {type(config).__name__}, not a run's config; restore the run's config.yaml"
        )
    return config


def load_summaries(
    paths: Iterable[str | os.PathLike[str]], with_config: bool = False, per_task: bool = False
) -> pd.DataFrame:
    """One row per run with its ``summary.json`` (per-step lists dropped) and a ``run`` column.

    ``with_config`` adds the run's resolved ``config.yaml`` flattened to dotted ``config.*`` columns
    (``config.method.init_args.lr``), so tables can split rows by any hyper-parameter, e.g. an ablation switch.
    ``per_task`` gives one row per (run, task) instead, with a ``task`` column (the task's name, and ``Average``
    for the run's average over tasks) and the :data:`PER_TASK_METRICS` of that task as columns: the layout of
    MTIL's tables (a column group per dataset) and of per-domain tables.
    """
    rows = []
    for path in find_runs(paths):
        summary = _read_summary(path / "summary.json")
        row = {"run": str(path), **{k: v for k, v in summary.items() if not isinstance(v, list)}}
        if with_config and (path / "config.yaml").is_file():
            config = _read_config(path / "config.yaml")
            flat = pd.json_normalize(config, sep=".").iloc[0].to_dict()
            row.update({f"config.{key}": _hashable(value) for key, value in flat.items()})
        rows.extend(_per_task_rows(path, summary, row) if per_task else [row])
    return pd.DataFrame(rows)


def _per_task_rows(path: Path, summary: dict[str, Any], row: dict[str, Any]) -> list[dict[str, Any]]:
    names = summary.get("task_names")
    if not isinstance(names, list):
        raise ValueError(
            f"{str(path / 'summary.json')!r} has no task_names (written by an older cil); resume the run "
            "(`cil run ... --resume true`) to rewrite its summary"
        )
    scalars = {key: value for key, value in row.items() if key not in PER_TASK_METRICS}
    rows = [{**scalars, "task": name} for name in names]
    average = {**scalars, "task": "Average"}
    for metric, (list_key, average_key) in PER_TASK_METRICS.items():
        values = [None if v is None else float(v) for v in summary.get(list_key) or [None] * len(names)]
        for task_row, value in zip(rows, values, strict=False):
            task_row[metric] = value
        finite = [v for v in values if v is not None]
        mean = sum(finite) / len(finite) if finite and len(finite) == len(values) else None
        average[metric] = summary.get(average_key) if average_key is not None else mean
    return [*rows, average]


def _hashable(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value
