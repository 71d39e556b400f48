"""Baselines: sequential fine-tuning (the lower bound) and joint training (the upper bound).

``finetune`` trains the whole network with cross-entropy over all seen classes on each task's data alone, with a
linear head that grows by the new classes (LAMDA-PILOT's ``finetune``): it forgets. ``joint`` retrains from the
pre-trained weights on the union of all tasks seen so far after every task, so each step is non-incremental
training on the seen classes; its cost grows with the stream (step ``i`` trains on ``i + 1`` tasks' data).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch.utils.data import ConcatDataset, Dataset

from cil.backbones import Backbone
from cil.heads import IncrementalLinear
from cil.method import CILMethod, register_method
from cil.task import Task


@register_method("finetune")
class Finetune(CILMethod):
    """Full fine-tuning, task after task, of the backbone and a growing linear head.

    Args:
        backbone: Pre-trained feature extractor (trained too).
        lr: Learning rate (cosine-annealed over each task's fit).
        momentum: SGD momentum.
        weight_decay: Weight decay.
        optimizer: ``"sgd"`` (PILOT's choice for pre-trained backbones) or ``"adamw"`` (what a ViT trained from
            scratch needs, e.g. the tiny test model).
        head_lr: The head's own learning rate (None: ``lr``).
    """

    supports_multilabel = True  # the base training step uses binary cross-entropy on multi-hot targets
    supports_distributed = True
    supported_scenarios: ClassVar[tuple[str, ...]] = (
        "class_incremental",
        "domain_incremental",
    )  # one loss over all seen classes

    def __init__(
        self,
        backbone: Backbone,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
        head_lr: float | None = None,
    ) -> None:
        super().__init__(backbone)
        self.lr, self.momentum, self.weight_decay, self.optimizer_name = lr, momentum, weight_decay, optimizer
        self.head_lr = head_lr
        self.head: IncrementalLinear = IncrementalLinear(backbone.num_features)

    def configure_optimizers(self) -> Any:
        return self.optimizer_with_cosine(
            self.optimizer_name, self.lr, self.momentum, self.weight_decay, head_lr=self.head_lr
        )


@register_method("joint")
class Joint(Finetune):
    """Upper bound: at every task, restart from the pre-trained backbone and train on all seen tasks' data."""

    supports_multilabel = False  # batches would mix multi-hot and integer targets

    def __init__(
        self,
        backbone: Backbone,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__(backbone, lr=lr, momentum=momentum, weight_decay=weight_decay, optimizer=optimizer)
        self._pretrained = copy.deepcopy(backbone.state_dict())

    def before_task(self, task: Task) -> None:
        self.backbone.load_state_dict(self._pretrained)
        with torch.no_grad():  # a fresh head over all seen classes, as in non-incremental training
            fresh = IncrementalLinear(self.head.in_features)
            fresh.expand(len(self.seen_classes))
            self.head.weight.copy_(fresh.weight)
            self.head.bias.copy_(fresh.bias)

    def train_dataset(self, task: Task, seen_tasks: Sequence[Task]) -> Dataset[Any]:
        return ConcatDataset([seen.train for seen in seen_tasks])
