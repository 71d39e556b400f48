"""SimpleCIL: prototype classifier on a frozen pre-trained model.

Zhou, Ye, Zhan, Liu. "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need" (IJCV 2024; arXiv:2303.07338), Sec. 4.1.

The backbone is never trained. After each task, the prototype of every new class is the mean embedding of its
training images under the *evaluation* transform; prediction is the cosine similarity to all prototypes.

Departures from the paper: none in the method. The paper's backbones are ViT-B/16 (IN-21k / IN-1k); the offline
quickstart uses an ImageNet EfficientNet-Lite0 at reduced resolution, so its numbers are not the paper's.
"""

from __future__ import annotations

from cil.backbones import Backbone
from cil.heads import PrototypeHead
from cil.method import CILMethod, FeatureFn, register_method
from cil.task import Task


@register_method("simplecil")
class SimpleCIL(CILMethod):
    """Frozen PTM + cosine nearest-prototype classifier; no gradient step at all."""

    supports_multilabel = True  # a label's prototype averages the images that show it; cosine scores rank them
    supports_distributed = True

    def __init__(self, backbone: Backbone) -> None:
        super().__init__(backbone)
        self.backbone.requires_grad_(False)
        self.head: PrototypeHead = PrototypeHead(backbone.num_features)

    @property
    def embedding_frozen(self) -> bool:
        return True

    def needs_fit(self, task: Task) -> bool:
        return False

    def after_task(self, task: Task, features: FeatureFn) -> None:
        embeddings, labels = features(task.train)  # [N, D], [N]
        self.head.set_prototypes(embeddings, labels, list(task.classes))
