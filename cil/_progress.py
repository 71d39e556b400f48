"""The line a person reads after each task of a long stream: its cost, the accuracy so far and the time left."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from cil.task import Task

__all__ = ["Progress"]


def _images(task: Task, seen: Sequence[Task]) -> int:
    """Images a task's step handles: its training images and every seen task's test images (evaluation)."""
    return len(task.train) + sum(len(t.test) for t in seen)  # type: ignore[arg-type, misc]


def _duration(seconds: float) -> str:
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Times the tasks a run trains (not those restored from a checkpoint) and estimates the rest of the stream in
    proportion to the images each step handles, so a stream whose tasks differ in size gets a fair ETA."""

    def __init__(self, tasks: Sequence[Task], start: int) -> None:
        self.tasks = tasks
        self.start = start
        self.started = time.perf_counter()
        self._work = [_images(task, tasks[: task.index + 1]) for task in tasks]

    def line(self, task: Task, cost: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
        """``task 3/29 name: fit 41 s, eval 6 s, A_3 = 81.2 %; 26 tasks left, about 14 min``.

        ``A_t`` is the accuracy on every seen class's test images after the task (sample-weighted, as Ā averages
        it); ``rows`` are the task's result rows."""
        seen = [row for row in rows if row["eval_task"] <= task.index and row["train_task"] == task.index]
        tested = sum(int(row["n_test"]) for row in seen)
        accuracy = sum(float(row["accuracy"]) * int(row["n_test"]) for row in seen) / tested if tested else float("nan")
        number = task.index + 1
        text = (
            f"task {number}/{len(self.tasks)} {task.name}: fit {_duration(cost['fit_s'])}, "
            f"eval {_duration(cost['eval_s'])}, A_{number} = {accuracy:.1f} %"
        )
        left = len(self.tasks) - number
        if left == 0:
            return text + f"; stream done in {_duration(time.perf_counter() - self.started)}"
        done = sum(self._work[self.start : number])
        remaining = sum(self._work[number:]) * (time.perf_counter() - self.started) / max(done, 1)
        return text + f"; {left} task{'s' if left > 1 else ''} left, about {_duration(remaining)}"
