"""APER (ADAM): adapt the pre-trained model once, on the first task, then classify by prototypes.

Zhou, Cai, Ye, Zhan, Liu. "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need" (IJCV 2024; arXiv:2303.07338), Sec. 4.2.

On the first task a copy of the PTM is adapted with one of {full fine-tuning, VPT-shallow, VPT-deep, SSF, adapter}
and a cosine classifier over the first task's classes (cross-entropy, SGD, cosine schedule), then frozen. The
embedding of an image is the concatenation of the frozen PTM's and the adapted model's features; every class's
prototype is its mean embedding over its training images, and prediction is the cosine similarity to the
prototypes, for every task, as in SimpleCIL.

Defaults follow the authors' released code and configs (LAMDA-PILOT ``exps/aper_*.json``): adapter bottleneck 64
(scale 0.1, dropout 0.1); 5 VPT tokens, initialised at zero, without dropout or position embeddings, appended after
the patch tokens and dropped after the last block (deep: fresh prompts before every block, the previous block's
prompt outputs dropped), so the feature is the class token after the final norm; SSF (scale ~ N(1, 0.02), shift ~
N(0, 0.02)) after every linear and norm layer of the blocks, after the patch projection and after the final norm;
20 epochs, SGD lr 0.01 momentum 0.9, weight decay 5e-4, cosine to 0 stepped once per epoch, batch 48
(``data.batch_size`` in the configs).

Departures:

- The adapter reads the normalised tokens, as in AdaptFormer's paper (PILOT's code feeds it the residual stream),
  and on LayerScale models (DINOv2) it is added after LayerScale.
- The PEFT modules are injected into the stock timm ViT, not a forked one, so any timm ViT works (DINOv2, register
  tokens) and the feature is that model's own pooling (the class token for ViT-B/16, as in the authors' code).
- VPT-deep keeps PILOT's schedule (20 epochs, lr 0.01, batch 48); RevisitingCIL's VPT-deep configs for CIFAR,
  CUB, ImageNet-R/A and VTAB use 5 epochs, lr 0.05, batch 16 (set ``epochs``, ``lr`` and ``data.batch_size``).

Switches the authors' code does not have: the VPT paper's uniform prompt init and prompt dropout 0.1
(``peft_options: {init: uniform, dropout: 0.1}``), SSF inside the blocks only (``peft_options: {patch_embed: false,
final_norm: false}``), and a cosine schedule stepped after every batch (``lr_interval: step``; the authors' steps
after every epoch, the default).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cil.adaptation import FirstTaskAdaptation
from cil.backbones import Backbone
from cil.heads import PrototypeHead
from cil.method import FeatureFn, register_method
from cil.task import Task


class APER(FirstTaskAdaptation):
    """Adapt on task 0 (``adapt`` in adapter / vpt_shallow / vpt_deep / ssf / finetune), prototypes throughout.

    Args:
        backbone: The pre-trained model; stays frozen, and a copy of it is adapted.
        adapt: How to adapt the copy on the first task.
        epochs: Epochs of first-task adaptation.
        lr: SGD learning rate (cosine-annealed).
        momentum: SGD momentum.
        weight_decay: Weight decay.
        peft_options: Overrides of the PEFT module's hyper-parameters (e.g. ``{"bottleneck": 16}``).
        lr_interval: Step the cosine schedule after every ``epoch`` (the authors') or every ``step``.
    """

    keeps_ptm = True

    def __init__(
        self,
        backbone: Backbone,
        adapt: str = "adapter",
        epochs: int = 20,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        peft_options: dict[str, Any] | None = None,
        lr_interval: str = "epoch",
    ) -> None:
        if adapt == "none":
            raise ValueError("APER without adaptation is SimpleCIL on duplicated features: use method simplecil")
        super().__init__(backbone, adapt, epochs, lr, momentum, weight_decay, peft_options, lr_interval)
        self.head: PrototypeHead = PrototypeHead(2 * backbone.num_features)

    def after_task(self, task: Task, features: FeatureFn) -> None:
        super().after_task(task, features)
        embeddings, labels = features(task.train)  # [N, 2D]
        if task.index == 0:  # how far adaptation moved the embedding away from the PTM's (0 = not at all)
            ptm, adapted = embeddings.chunk(2, dim=-1)  # [N, D] each
            self.task_info["adapted_vs_ptm_cosine"] = float(F.cosine_similarity(ptm, adapted, dim=-1).mean())
        self.head.set_prototypes(embeddings, labels, list(task.classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.backbone(x), self.adapted(x)], dim=-1)  # [B, 2D]


def _variant(name: str, adapt: str) -> type[APER]:
    """A registered APER subclass with ``adapt`` fixed, so configs name the variant by class."""

    def __init__(  # noqa: N807 - becomes the subclass's __init__
        self: APER,
        backbone: Backbone,
        epochs: int = 20,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        peft_options: dict[str, Any] | None = None,
        lr_interval: str = "epoch",
    ) -> None:
        APER.__init__(self, backbone, adapt, epochs, lr, momentum, weight_decay, peft_options, lr_interval)

    cls = type(name, (APER,), {"__init__": __init__, "__doc__": f"APER adapted with {adapt} on the first task."})
    cls.__module__ = __name__
    return register_method(f"aper_{adapt}")(cls)


APERAdapter = _variant("APERAdapter", "adapter")
APERVPTShallow = _variant("APERVPTShallow", "vpt_shallow")
APERVPTDeep = _variant("APERVPTDeep", "vpt_deep")
APERSSF = _variant("APERSSF", "ssf")
APERFinetune = _variant("APERFinetune", "finetune")
