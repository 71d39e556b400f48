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

from collections.abc import Sequence
from typing import Any

import torch

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
        self.class_images: dict[int, int] = {}  # training images behind each prototype (domains average by it)

    @property
    def embedding_frozen(self) -> bool:
        return True

    def needs_fit(self, task: Task) -> bool:
        return False

    def after_task(self, task: Task, features: FeatureFn) -> None:
        embeddings, labels = features(task.train)  # [N, D], [N] (or multi-hot [N, C_task])
        earlier = {c: self.class_images[c] for c in task.classes if c in self.class_images}
        previous = {c: self.head.prototypes[c].clone() for c in earlier}
        self.head.set_prototypes(embeddings, labels, list(task.classes))  # this task's class means
        if labels.ndim != 1:
            return  # multi-label tasks are class-incremental: no class comes back
        for c in task.classes:
            images = int((labels == c).sum())
            if c in earlier:  # a later domain: the mean over every image of the class so far
                total = earlier[c] + images
                with torch.no_grad():
                    self.head.prototypes[c] = (previous[c] * earlier[c] + self.head.prototypes[c] * images) / total
            self.class_images[c] = earlier.get(c, 0) + images

    def cil_state(self) -> dict[str, Any]:
        return {**super().cil_state(), "class_images": dict(self.class_images)}

    def load_cil_state(self, state: dict[str, Any], tasks: Sequence[Task]) -> None:
        super().load_cil_state(state, tasks)
        self.class_images = dict(state.get("class_images", {}))  # absent before domain streams: never needed there
