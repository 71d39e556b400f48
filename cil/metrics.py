"""Continual-learning metrics as pure functions over the accuracy matrix, plus a per-task accuracy ``Metric``.

The pure functions need only numpy; :class:`TaskAccuracy` (torchmetrics) is imported on first use, so the analysis
commands and notebooks that read run directories do not import torch.

Notation: ``R[i, j]`` is the top-1 accuracy (percent) on task ``j``'s test set after training task ``i``
(``T x T``; entries that were not evaluated are NaN, e.g. the upper triangle in class-incremental learning,
where the model has no logits for classes it has not seen). ``n_test[j]`` is the size of task ``j``'s test set.
The upper triangle (``j > i``: task ``j`` scored before it was trained) is measured with ``cil run --evaluate_future
true`` (:mod:`cil.transfer`), for methods that score classes they have not trained on, and on domain-incremental
streams after the first domain; ``baseline[j]`` is task ``j``'s score before the first task (the pre-trained model,
zero-shot), for the former only.

Worked example (3 tasks, 100 test images each)::

    R = [[90, nan, nan],
         [70,  80, nan],
         [60,  75,  85]]

    seen_accuracy       = [90, 75, 73.33]     # accuracy on the union of seen tasks' test images, per step
    avg_incremental_acc = 79.44                # mean of seen_accuracy (PILOT / MOS report this as A-bar)
    last_acc            = 73.33                # seen_accuracy[-1]
    avg_forgetting      = 17.5                 # ((90 - 60) + (80 - 75)) / 2  -> mean over tasks 0..T-2
    bwt                 = -17.5                # ((60 - 90) + (75 - 80)) / 2
    old_new             = old: [nan, 70, 67.5], new: [90, 80, 85]

MTIL's three numbers (Zheng et al., ZSCL, ICCV 2023; CoDyRA, MoE-Adapters) are column statistics of a full
matrix, per task and then averaged over tasks::

    R = [[90, 40, 30],
         [70, 80, 35],
         [60, 75, 85]]

    mtil_transfer_per_task = [nan, 40, 32.5]  # mean of R[:j, j]: task j before it was trained
    mtil_transfer          = 36.25             # mean over tasks 1..T-1 (task 0 has no "before")
    mtil_average_per_task  = [73.33, 65, 50]   # mean of the whole column: every step
    mtil_average           = 62.78
    mtil_last_per_task     = [60, 75, 85]      # the last row
    mtil_last              = 73.33

Differences from LAMDA-PILOT: PILOT's forgetting takes, for each old task, the max over *all* steps including
the last one, so it is never negative; ours follows Chaudhry et al. (2018), the max over the steps *before* the
last, so a method whose old-task accuracy improved shows negative forgetting. PILOT also measures forgetting on
fixed blocks of classes, not on tasks; with ``B0-Inc`` splits these are the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    from cil._task_accuracy import TaskAccuracy

__all__ = [
    "TaskAccuracy",
    "avg_forgetting",
    "avg_incremental_acc",
    "bwt",
    "forgetting_per_task",
    "fwt",
    "last_acc",
    "mtil_average",
    "mtil_average_per_task",
    "mtil_last",
    "mtil_last_per_task",
    "mtil_transfer",
    "mtil_transfer_per_task",
    "old_new_accuracy",
    "seen_accuracy",
]

FloatArray = NDArray[np.float64]


def _square(R: ArrayLike) -> FloatArray:
    matrix = np.asarray(R, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"the accuracy matrix must be square (T x T), got shape {matrix.shape}")
    return matrix


def _weights(n_test: ArrayLike | None, num_tasks: int) -> FloatArray:
    if n_test is None:
        return np.ones(num_tasks)
    weights = np.asarray(n_test, dtype=np.float64)
    if weights.shape != (num_tasks,):
        raise ValueError(f"n_test must have one entry per task ({num_tasks}), got shape {weights.shape}")
    return weights


def seen_accuracy(R: ArrayLike, n_test: ArrayLike | None = None) -> FloatArray:
    """Accuracy on the union of all seen tasks' test images after each step, ``[T]``.

    The test-set-size-weighted mean of ``R[i, :i+1]``; with equal test sets it is the row mean.
    """
    matrix = _square(R)
    weights = _weights(n_test, matrix.shape[0])
    out = np.empty(matrix.shape[0])
    for i in range(matrix.shape[0]):
        out[i] = np.average(matrix[i, : i + 1], weights=weights[: i + 1])
    return out


def avg_incremental_acc(R: ArrayLike, n_test: ArrayLike | None = None) -> float:
    """Average incremental accuracy A-bar: the mean over steps of :func:`seen_accuracy`."""
    return float(seen_accuracy(R, n_test).mean())


def last_acc(R: ArrayLike, n_test: ArrayLike | None = None) -> float:
    """Accuracy on all classes after the last task, A_last."""
    return float(seen_accuracy(R, n_test)[-1])


def forgetting_per_task(R: ArrayLike, step: int | None = None) -> FloatArray:
    """Forgetting of each old task at ``step`` (default: the last), Chaudhry et al. (2018).

    ``f_j = max_{j <= l < step} R[l, j] - R[step, j]`` for ``j < step``; shape ``[step]``. Only steps from task
    ``j``'s own on count: a score from before it was trained (the upper triangle) was never learned, so it cannot be
    forgotten.
    """
    matrix = _square(R)
    k = matrix.shape[0] - 1 if step is None else step
    if not 0 <= k < matrix.shape[0]:
        raise ValueError(f"step {k} is outside the stream's {matrix.shape[0]} tasks")
    return np.array([np.nanmax(matrix[j:k, j]) - matrix[k, j] for j in range(k)])


def avg_forgetting(R: ArrayLike) -> float:
    """Mean forgetting over the old tasks at the last step; NaN for a one-task stream."""
    per_task = forgetting_per_task(R)
    return float(per_task.mean()) if per_task.size else float("nan")


def bwt(R: ArrayLike) -> float:
    """Backward transfer (Lopez-Paz & Ranzato, 2017): mean of ``R[T-1, j] - R[j, j]`` over ``j < T-1``."""
    matrix = _square(R)
    num_tasks = matrix.shape[0]
    if num_tasks < 2:
        return float("nan")
    return float(np.mean([matrix[-1, j] - matrix[j, j] for j in range(num_tasks - 1)]))


def fwt(R: ArrayLike, baseline: ArrayLike) -> float:
    """Forward transfer (Lopez-Paz & Ranzato, 2017): mean of ``R[j-1, j] - baseline[j]`` over ``j >= 1``.

    ``R[j-1, j]`` is the accuracy on task ``j`` *before* training it and ``baseline[j]`` the accuracy of the
    untrained model on it. Both are measured only with ``evaluate_future`` (``R[j-1, j]`` also on domain-incremental
    streams, ``baseline`` only for methods that score classes by name); otherwise they are NaN and so is the result.
    """
    matrix = _square(R)
    base = np.asarray(baseline, dtype=np.float64)
    num_tasks = matrix.shape[0]
    if num_tasks < 2:
        return float("nan")
    if base.shape != (num_tasks,):
        raise ValueError(f"baseline must have one entry per task ({num_tasks}), got shape {base.shape}")
    return float(np.mean([matrix[j - 1, j] - base[j] for j in range(1, num_tasks)]))


def mtil_transfer_per_task(R: ArrayLike) -> FloatArray:
    """MTIL's Transfer of each task: the mean of ``R[:j, j]``, its scores after each earlier step (before it was
    trained); NaN for task 0, and wherever one of those scores was not measured. Shape ``[T]``."""
    matrix = _square(R)
    out = np.full(matrix.shape[0], np.nan)
    for j in range(1, matrix.shape[0]):
        out[j] = matrix[:j, j].mean()
    return out


def mtil_transfer(R: ArrayLike) -> float:
    """MTIL's Transfer: :func:`mtil_transfer_per_task` averaged over tasks ``1..T-1``; NaN with fewer than 2 tasks."""
    per_task = mtil_transfer_per_task(R)[1:]
    return float(per_task.mean()) if per_task.size else float("nan")


def mtil_average_per_task(R: ArrayLike) -> FloatArray:
    """MTIL's Average of each task: the mean of its column, over every step before and after it was trained."""
    return _square(R).mean(axis=0)


def mtil_average(R: ArrayLike) -> float:
    """MTIL's Average: :func:`mtil_average_per_task` averaged over tasks (the mean of the whole matrix)."""
    return float(mtil_average_per_task(R).mean())


def mtil_last_per_task(R: ArrayLike) -> FloatArray:
    """MTIL's Last of each task: its score after the whole stream (the last row)."""
    return _square(R)[-1].copy()


def mtil_last(R: ArrayLike) -> float:
    """MTIL's Last: the last row averaged over tasks (unweighted, unlike :func:`last_acc`)."""
    return float(mtil_last_per_task(R).mean())


def old_new_accuracy(R: ArrayLike, n_test: ArrayLike | None = None) -> tuple[FloatArray, FloatArray]:
    """Per step, accuracy on the old tasks' test images (``j < i``; NaN at step 0) and on the new task's."""
    matrix = _square(R)
    weights = _weights(n_test, matrix.shape[0])
    old = np.full(matrix.shape[0], np.nan)
    for i in range(1, matrix.shape[0]):
        old[i] = np.average(matrix[i, :i], weights=weights[:i])
    return old, np.diag(matrix).copy()


def __getattr__(name: str) -> Any:
    if name == "TaskAccuracy":  # torchmetrics and torch only for those who use it
        from cil._task_accuracy import TaskAccuracy

        return TaskAccuracy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
