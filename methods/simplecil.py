"""SimpleCIL: prototype classifier on a frozen pre-trained model.

Zhou, Ye, Zhan, Liu. "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need" (IJCV 2024; arXiv:2303.07338), Sec. 4.1.

The backbone is never trained. After each task, the prototype of every new class is the mean embedding of its
training images under the *evaluation* transform; prediction is the cosine similarity to all prototypes. In a
domain-incremental stream a task brings new images of classes seen before; a class's prototype is then the mean
over its training images in every domain so far (the class mean of all data seen, as a joint prototype would be).

Departures from the paper: none in the method. The paper's backbones are ViT-B/16 (IN-21k / IN-1k); the offline
quickstart uses an ImageNet EfficientNet-Lite0 at reduced resolution, so its numbers are not the paper's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from cil.backbones import Backbone
from cil.heads import PrototypeHead
from cil.method import CILMethod, FeatureFn, register_method
from cil.task import Task


@register_method("simplecil")
class SimpleCIL(CILMethod):
    """Frozen PTM + cosine nearest-prototype classifier; no gradient step at all."""

    supports_multilabel = True  # a label's prototype averages the images that show it; cosine scores rank them
    supports_distributed = True
    supported_scenarios = ("class_incremental", "domain_incremental")

    def __init__(self, backbone: Backbone) -> None:
        super().__init__(backbone)
        self.backbone.requires_grad_(False)
        self.head: PrototypeHead = PrototypeHead(backbone.num_features)
        self.training_sets: list[Dataset[Any]] = []  # every task's training data so far (replayed by grow on resume)

    def grow(self, task: Task) -> None:
        super().grow(task)
        self.training_sets.append(task.train)

    @property
    def embedding_frozen(self) -> bool:
        return True

    def needs_fit(self, task: Task) -> bool:
        return False

    def after_task(self, task: Task, features: FeatureFn) -> None:
        seen_before = len(self.new_classes) < task.num_classes  # a later domain: its classes have earlier images
        parts = [features(data) for data in (self.training_sets if seen_before else [task.train])]  # cached: frozen
        embeddings, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # [N, D], [N]
        self.head.set_prototypes(embeddings, labels, list(task.classes))
