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

A resumed run's training steps go on after the finished tasks', and a tracker that starts a new run gets the finished
tasks' numbers first, so it is complete (one given the id of the run it continues does not). The run directory stays
the record: a tracker that fails after the start (a lost connection) is reported once, the run goes on, and the
tracker is still finalized.
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
        self.tracker.advance(step + 1)
        self.tracker.guarded(self.inner, self.inner.log_metrics, metrics, step=step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Dropped: Lightning sends the module's hparams every fit; the run logs its whole config once."""

    def save(self) -> None:
        self.tracker.guarded(self.inner, self.inner.save)

    def finalize(self, status: str) -> None:
        """Not passed on (every fit ends with ``finalize("success")``; the run finalizes once, with its own status);
        the next fit's steps start after this one's, logged or not."""
        self.tracker.advance(self.base + self.trainer.global_step)


class RunTracker:
    """The user's loggers, held for a whole run (see the module docstring)."""

    def __init__(self, loggers: Iterable[Logger]) -> None:
        self.loggers = list(loggers)
        for logger in self.loggers:
            if not isinstance(logger, Logger):
                raise ValueError(
                    "trainer.logger must be a Lightning logger such as {class_path: "
                    f"lightning.pytorch.loggers.WandbLogger, init_args: {{project: cil}}}} (or a list of them), got "
                    f"{logger!r}; per-task logs in OUT/logs are --logger csv|tensorboard|none"
                )
        self.next_step = 0  # the first step of the next fit: training curves of consecutive tasks follow each other
        self.started: list[Logger] = []
        self._failed: set[int] = set()

    def start(self, hyperparameters: Mapping[str, Any], config_hash: str) -> None:
        """Logs the run's config; a logger that cannot start (bad URI, missing package) stops the run here, before
        anything is written, and the loggers already started end as failed."""
        for logger in self.loggers:
            try:
                if isinstance(logger, WandbLogger):  # per-task numbers against the task index, not W&B's own step
                    for pattern in ("eval/*", "cost/*"):
                        logger.experiment.define_metric(pattern, step_metric="task")
                logger.log_hyperparams({**hyperparameters, "config_hash": config_hash})
            except Exception as error:  # any tracker's own error type
                self.finish(None, None, "failed")
                reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
                raise ValueError(f"trainer.logger {type(logger).__name__} could not start: {reason}") from error
            self.started.append(logger)

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
        """For a resumed run: its training steps go on after the finished tasks' (``train_steps`` of ``tasks.csv``),
        and a tracker that starts a new run gets the finished tasks' numbers first, as :meth:`task_done` logged
        them then (a tracker given the id of the run it continues already has them)."""
        self.next_step = sum(int(cost.get("train_steps") or 0) for cost in costs)
        fresh = [logger for logger in self.started if not _continues(logger)]
        frame = pd.DataFrame(list(results))
        for cost in costs if fresh else ():
            seen = frame[frame["train_task"] <= cost["task"]]
            summary = summarize(seen, pd.DataFrame(list(costs[: int(cost["task"]) + 1])), num_tasks, label_space,
                                evaluate_future)  # fmt: skip
            self.task_done(summary, cost, fresh)

    def task_done(
        self, summary: Mapping[str, Any], cost: Mapping[str, Any], loggers: Sequence[Logger] | None = None
    ) -> None:
        """Logs task ``cost["task"]``'s numbers at that task's index (see :func:`task_metrics`)."""
        metrics, step = task_metrics(summary, cost), int(cost["task"])
        for logger in self.started if loggers is None else loggers:
            if isinstance(logger, WandbLogger):  # Lightning's log_metrics would set trainer/global_step to the task
                self.guarded(logger, _wandb_log, logger, metrics)
            else:
                self.guarded(logger, logger.log_metrics, metrics, step=step)

    def finish(self, summary: Mapping[str, Any] | None, out: Path | None, status: str = "success") -> None:
        """The summary as ``summary/*`` metrics and the accuracy matrix as a table (where the run has results), then
        each logger's ``finalize`` once, also after a failure: W&B's run is closed so that the next run of this
        process (the next seed) gets its own."""
        final = {} if summary is None else {f"summary/{key}": v for key, v in _numbers(summary).items()}
        step = 0 if summary is None else max(int(summary["finished_tasks"]) - 1, 0)
        for logger in self.started:
            if summary is not None and out is not None:
                if isinstance(logger, WandbLogger):  # the run's summary, not one more history row
                    self.guarded(logger, _wandb_summary, logger, final)
                else:
                    self.guarded(logger, logger.log_metrics, final, step=step)
                table = next((f for kind, f in _TABLES.items() if isinstance(logger, kind)), None)
                if table is not None:
                    self.guarded(logger, table, logger, summary, out)
            self._failed.discard(id(logger))  # closing is tried whatever failed before
            self.guarded(logger, logger.finalize, status)
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                self._failed.discard(id(logger))
                self.guarded(logger, _wandb_finish, logger, status)
        self.started = []

    def advance(self, step: int) -> None:
        """A fit reached ``step`` (stream-wide): the next fit starts after it."""
        self.next_step = max(self.next_step, step)

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


def _continues(logger: Logger) -> bool:
    """Whether ``logger`` was given the id of an existing tracker run to continue (W&B ``id``, MLflow ``run_id``)."""
    if isinstance(logger, WandbLogger):
        return logger._wandb_init.get("id") is not None  # Lightning keeps the init arguments there
    if isinstance(logger, MLFlowLogger):
        return logger._run_id is not None  # set at init only when given
    return False


def _wandb_log(logger: WandbLogger, metrics: dict[str, float]) -> None:
    logger.experiment.log(metrics)


def _wandb_summary(logger: WandbLogger, final: dict[str, float]) -> None:
    logger.experiment.summary.update(final)


def _wandb_finish(logger: WandbLogger, status: str) -> None:
    logger.experiment.finish(exit_code=int(status != "success"))


# ---- the accuracy matrix as a table, per tracker -----------------------------------------------------------------
def _matrix_rows(summary: Mapping[str, Any], out: Path) -> tuple[list[str], list[list[Any]]]:
    """The accuracy matrix as ``after task, R[i, 0], ..., R[i, T-1]`` rows, read from the run's own CSV file."""
    matrix = pd.read_csv(out / "accuracy_matrix.csv", index_col=0)
    names = list(summary.get("task_names") or matrix.columns)
    columns = ["after task", *[f"{j}: {name}" for j, name in enumerate(names)]][: matrix.shape[1] + 1]
    rows = [[int(i), *(None if pd.isna(v) else float(v) for v in row)] for i, row in enumerate(matrix.to_numpy())]
    return columns, rows


def _wandb_table(logger: WandbLogger, summary: Mapping[str, Any], out: Path) -> None:
    columns, rows = _matrix_rows(summary, out)
    logger.log_table(key="accuracy_matrix", columns=columns, data=rows)


def _mlflow_table(logger: MLFlowLogger, summary: Mapping[str, Any], out: Path) -> None:
    """The matrix as a table artifact, and the run directory's result files under ``run/``."""
    columns, rows = _matrix_rows(summary, out)
    run_id = logger.run_id
    logger.experiment.log_table(run_id, data=pd.DataFrame(rows, columns=columns), artifact_file="accuracy_matrix.json")
    for name in RUN_FILES:
        if (out / name).is_file():
            logger.experiment.log_artifact(run_id, str(out / name), artifact_path="run")


def _tensorboard_table(logger: TensorBoardLogger, summary: Mapping[str, Any], out: Path) -> None:
    columns, rows = _matrix_rows(summary, out)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in rows]  # fmt: skip
    logger.experiment.add_text("accuracy_matrix", "\n".join(lines))


_TABLES: dict[type, Callable[[Any, Mapping[str, Any], Path], None]] = {
    WandbLogger: _wandb_table,
    MLFlowLogger: _mlflow_table,
    TensorBoardLogger: _tensorboard_table,
}
"""How the accuracy matrix reaches a tracker that has tables (others get the ``summary/*`` metrics only)."""
