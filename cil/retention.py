"""Knowledge retention: how much of the pre-trained model's general ability survives continual training.

The probe is a nearest-prototype classifier on the backbone's features (``method.backbone``, with whatever the
method injected into or merged into it) for held-out tasks that the stream never trains: class prototypes from
each held-out task's training images, cosine nearest prototype on its test images, within the task's own classes.
Measured before the first task and after every task, it is the vision-only analogue of MTIL's "Transfer"
(zero-shot accuracy on tasks not yet learned) that CoDyRA reports, and it applies to every method: SimpleCIL's is
constant by construction, full fine-tuning's falls the most.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from cil.heads import PrototypeHead
from cil.stream import Stream

__all__ = ["retention_accuracy"]

BackboneFeatures = Callable[[Dataset[Any]], tuple[torch.Tensor, torch.Tensor]]
"""``features(dataset) -> (backbone features [N, D], labels [N])``."""


@torch.no_grad()
def retention_accuracy(held_out: Stream, features: BackboneFeatures) -> dict[str, float]:
    """Per held-out task, the nearest-prototype accuracy (percent) of the current backbone features, and their
    unweighted mean under ``"mean"``."""
    scores: dict[str, float] = {}
    for task in held_out:
        if task.kind != "multiclass":
            raise ValueError(f"retention task {task.name} is {task.kind}; the probe needs multi-class tasks")
        train, train_labels = features(task.train)  # [N, D], [N]
        test, test_labels = features(task.test)
        head = PrototypeHead(train.shape[1])
        head.expand(task.classes[-1] + 1)
        head.set_prototypes(train, train_labels, list(task.classes))
        own = head(test)[:, task.classes[0] : task.classes[-1] + 1]  # [N_test, C_task]
        predictions = own.argmax(dim=1) + task.classes[0]
        scores[task.name] = round(100.0 * float((predictions == test_labels).float().mean()), 4)
    scores["mean"] = round(sum(scores.values()) / len(held_out), 4)
    return scores
