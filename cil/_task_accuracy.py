"""The per-task accuracy ``Metric`` (torchmetrics), re-exported by :mod:`cil.metrics` on first use."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

__all__ = ["TaskAccuracy"]


class TaskAccuracy(Metric):
    """Top-1 accuracy per task, accumulated over batches that may mix tasks.

    ``update(logits_or_preds, target, task_ids)``; ``compute()`` returns ``{"correct": [T], "total": [T]}``
    so that callers can derive per-task accuracy and the accuracy on any union of tasks exactly.
    """

    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_tasks = num_tasks
        self.add_state("correct", default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, task_ids: torch.Tensor) -> None:
        if preds.ndim == 2:  # [B, C] logits -> [B] labels
            preds = preds.argmax(dim=1)
        hits = (preds == target).long()
        self.correct += torch.bincount(task_ids, weights=hits, minlength=self.num_tasks).long()
        self.total += torch.bincount(task_ids, minlength=self.num_tasks)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"correct": self.correct, "total": self.total}

    def accuracy(self) -> torch.Tensor:
        """Per-task accuracy in percent, NaN for tasks without samples, ``[T]``."""
        total = self.total.double()
        return torch.where(total > 0, 100.0 * self.correct.double() / total.clamp(min=1), torch.nan)
