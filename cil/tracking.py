"""Experiment trackers (W&B, MLflow, TensorBoard, any Lightning ``Logger``) over a whole stream.

Lightning gives every ``Trainer`` its own logger run and restarts ``global_step`` at every fit, and the engine makes a
fresh ``Trainer`` per task. A tracker should instead show one run per ``cil run``. :class:`RunTracker` holds the
user's loggers for the whole stream and gives each fit a :class:`_FitLogger` view of them that

- shifts the fit's steps so that the training curves of consecutive tasks follow each other (one x-axis), and
- drops what Lightning does per fit that belongs to the run: ``log_hyperparams`` (the run logs its resolved config
  once) and ``finalize`` (the run finalizes once, with the run's status).

What a tracker gets from a run, besides the training metrics the method logs:

- at the start, the resolved config (plus ``config_hash``) as hyper-parameters;
- after task ``t``, at step ``t`` (W&B plots ``eval/*`` and ``cost/*`` against ``task``): ``eval/seen_acc`` (A_t),
  ``eval/old_acc``, ``eval/new_acc``, ``eval/task_{j:03d}_acc`` (R[t, j]), the running ``eval/avg_incremental_acc``,
  ``eval/avg_forgetting`` and ``eval/bwt``, and ``cost/fit_s``, ``cost/eval_s``, ``cost/train_images``;
- at the end, every number of ``summary.json`` as ``summary/<key>``, and the accuracy matrix as a table where the
  tracker has tables (a W&B table, an MLflow table artifact with the run directory's result files, a TensorBoard
  text).

A resumed run logs its finished tasks again first, so a fresh tracker run is complete. The run directory stays the
record: a tracker that fails after the start (a lost connection) is reported once and the run goes on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from cil.results import summarize

__all__ = ["RunTracker", "task_metrics"]

log = logging.getLogger(__name__)

RUN_FILES = ("summary.json", "accuracy_matrix.csv", "results.csv", "tasks.csv", "config.yaml", "stream.json")
"""The run directory's files an MLflow run keeps as artifacts."""


def task_metrics(summary: Mapping[str, Any], cost: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a tracker shows after a task, from the run's summary up to that task and the task's cost row."""
    metrics: dict[str, Any] = {
        "task": cost["task"],
        "eval/seen_acc": summary["last_acc"],
        "eval/old_acc": summary["old_accuracy"][-1],
        "eval/new_acc": summary["new_accuracy"][-1],
        "eval/avg_incremental_acc": summary["avg_incremental_acc"],
        "eval/avg_forgetting": summary["avg_forgetting"],
        "eval/bwt": summary["bwt"],
        **{f"eval/task_{j:03d}_acc": score for j, score in enumerate(summary["final_task_scores"])},
        "cost/fit_s": cost["fit_s"],
        "cost/eval_s": cost["eval_s"],
        "cost/train_images": cost["train_images"],
    }
    return _numbers(metrics)


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` (trackers reject None, text and lists)."""
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float | np.number) and not isinstance(value, bool) and math.isfinite(value)
    }


class _FitLogger(Logger):
    """One fit's view of a run-long logger: steps shifted by ``base``, per-fit hyper-parameters and finalize dropped."""

    def __init__(self, inner: Logger, tracker: RunTracker, trainer: Trainer) -> None:
        super().__init__()
        self.inner, self.tracker, self.trainer = inner, tracker, trainer
        self.base = tracker.next_step

    @property
    def name(self) -> str | None:
        return self.inner.name

    @property
    def version(self) -> int | str | None:
        return self.inner.version

    @property
    def save_dir(self) -> str | None:
        return self.inner.save_dir

    @property
    def experiment(self) -> Any:
        return getattr(self.inner, "experiment", None)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = self.base + (step or 0)
        self.tracker.next_step = max(self.tracker.next_step, step + 1)
        self.tracker.guarded(self.inner, self.inner.log_metrics, metrics, step=step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Dropped: Lightning sends the module's hparams every fit; the run logs its whole config once."""

    def save(self) -> None:
        self.tracker.guarded(self.inner, self.inner.save)

    def finalize(self, status: str) -> None:
        """Not passed on (every fit ends with ``finalize("success")``; the run finalizes once, with its own status);
        the next fit's steps start after this one's, logged or not."""
        self.tracker.next_step = max(self.tracker.next_step, self.base + self.trainer.global_step)


class RunTracker:
    """The user's loggers, held for a whole run (see the module docstring)."""

    def __init__(self, loggers: Iterable[Logger]) -> None:
        self.loggers = list(loggers)
        for logger in self.loggers:
            if not isinstance(logger, Logger):
                raise ValueError(
                    "trainer.logger must be Lightning loggers ({class_path: lightning.pytorch.loggers.WandbLogger, "
                    f"init_args: {{...}}}}), got {logger!r}"
                )
        self.next_step = 0  # the first step of the next fit: training curves of consecutive tasks follow each other
        self._failed: set[int] = set()

    def start(self, config: Mapping[str, Any], config_hash: str) -> None:
        """Logs the resolved config; a logger that cannot start (bad URI, missing package) stops the run here, before
        anything trains."""
        for logger in self.loggers:
            try:
                if isinstance(logger, WandbLogger):  # per-task numbers against the task index, not W&B's own step
                    for pattern in ("eval/*", "cost/*"):
                        logger.experiment.define_metric(pattern, step_metric="task")
                logger.log_hyperparams({**config, "config_hash": config_hash})
            except Exception as error:  # any tracker's own error type
                reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
                raise ValueError(f"trainer.logger {type(logger).__name__} could not start: {reason}") from error

    def attach(self, trainer: Trainer) -> None:
        """Adds a view of every tracker to ``trainer`` (one fit), after the trainer's own per-task logger."""
        trainer.loggers = [*trainer.loggers, *(_FitLogger(logger, self, trainer) for logger in self.loggers)]

    def replay(
        self,
        results: Sequence[Mapping[str, Any]],
        costs: Sequence[Mapping[str, Any]],
        num_tasks: int,
        label_space: str,
        evaluate_future: bool,
    ) -> None:
        """Logs the tasks a resumed run finished before (its ``results.csv`` rows and ``tasks.csv`` rows), as
        :meth:`task_done` logged them then."""
        frame = pd.DataFrame(list(results))
        for cost in costs:
            seen = frame[frame["train_task"] <= cost["task"]]
            summary = summarize(seen, pd.DataFrame(list(costs[: int(cost["task"]) + 1])), num_tasks, label_space,
                                evaluate_future)  # fmt: skip
            self.task_done(summary, cost)

    def task_done(self, summary: Mapping[str, Any], cost: Mapping[str, Any]) -> None:
        """Logs task ``cost["task"]``'s numbers at that task's index (see :func:`task_metrics`)."""
        metrics, step = task_metrics(summary, cost), int(cost["task"])
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):  # Lightning's log_metrics would set trainer/global_step to the task
                self.guarded(logger, _wandb_log, logger, metrics)
            else:
                self.guarded(logger, logger.log_metrics, metrics, step=step)

    def finish(self, summary: Mapping[str, Any] | None, out: Path, status: str = "success") -> None:
        """The summary as ``summary/*`` metrics and the accuracy matrix as a table (where the run has results), then
        each logger's ``finalize`` once; W&B's run is closed so that the next run of this process gets its own."""
        final = {} if summary is None else {f"summary/{key}": v for key, v in _numbers(summary).items()}
        step = 0 if summary is None else max(int(summary["finished_tasks"]) - 1, 0)
        for logger in self.loggers:
            if summary is not None:
                publish = next((f for kind, f in _PUBLISH.items() if isinstance(logger, kind)), _publish_metrics)
                self.guarded(logger, publish, logger, final, step, out, summary)
            self.guarded(logger, logger.finalize, status)
            if isinstance(logger, WandbLogger) and logger._experiment is not None:  # no run made just to close it
                self.guarded(logger, _wandb_finish, logger, status)

    def guarded(self, logger: Logger, action: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Runs ``action(*args, **kwargs)`` for ``logger``; a tracker's failure is logged once and the run goes on:
        its run directory holds every result."""
        if id(logger) in self._failed:
            return
        try:
            action(*args, **kwargs)
        except Exception as error:  # any tracker's own error type
            self._failed.add(id(logger))
            log.warning(
                "trainer.logger %s failed (%s: %s); it gets nothing more from this run, whose run directory holds "
                "every result",
                *(type(logger).__name__, type(error).__name__, error),
            )


def _wandb_log(logger: WandbLogger, metrics: dict[str, float]) -> None:
    logger.experiment.log(metrics)


def _wandb_finish(logger: WandbLogger, status: str) -> None:
    logger.experiment.finish(exit_code=int(status != "success"))


# ---- tables and files, per tracker -------------------------------------------------------------------------------
def _matrix_rows(summary: Mapping[str, Any], out: Path) -> tuple[list[str], list[list[Any]]]:
    """The accuracy matrix as ``after task, R[i, 0], ..., R[i, T-1]`` rows, read from the run's own CSV file."""
    matrix = pd.read_csv(out / "accuracy_matrix.csv", index_col=0)
    names = list(summary.get("task_names") or matrix.columns)
    columns = ["after task", *[f"{j}: {name}" for j, name in enumerate(names)]][: matrix.shape[1] + 1]
    rows = [[int(i), *(None if pd.isna(v) else float(v) for v in row)] for i, row in enumerate(matrix.to_numpy())]
    return columns, rows


def _publish_metrics(logger: Logger, final: dict[str, float], step: int, out: Path, summary: Any) -> None:
    logger.log_metrics(final, step=step)


def _publish_wandb(logger: WandbLogger, final: dict[str, float], step: int, out: Path, summary: Any) -> None:
    columns, rows = _matrix_rows(summary, out)
    logger.log_table(key="accuracy_matrix", columns=columns, data=rows)
    logger.experiment.summary.update(final)


def _publish_mlflow(logger: MLFlowLogger, final: dict[str, float], step: int, out: Path, summary: Any) -> None:
    logger.log_metrics(final, step=step)
    columns, rows = _matrix_rows(summary, out)
    run_id = logger.run_id
    logger.experiment.log_table(run_id, data=pd.DataFrame(rows, columns=columns), artifact_file="accuracy_matrix.json")
    for name in RUN_FILES:
        if (out / name).is_file():
            logger.experiment.log_artifact(run_id, str(out / name), artifact_path="run")


def _publish_tensorboard(
    logger: TensorBoardLogger, final: dict[str, float], step: int, out: Path, summary: Any
) -> None:
    logger.log_metrics(final, step=step)
    columns, rows = _matrix_rows(summary, out)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in rows]  # fmt: skip
    logger.experiment.add_text("accuracy_matrix", "\n".join(lines))


_PUBLISH: dict[type, Callable[..., None]] = {
    WandbLogger: _publish_wandb,
    MLFlowLogger: _publish_mlflow,
    TensorBoardLogger: _publish_tensorboard,
}
"""How a run's end reaches a tracker that has tables or files (others get the ``summary/*`` metrics only)."""
