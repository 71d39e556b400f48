"""First-session adaptation: tune a pre-trained model on the first task only, then freeze it for the stream.

APER, RanPAC and FeCAM (in LAMDA-PILOT's port) share one recipe from the authors' code (RevisitingCIL, RanPAC,
PILOT ``exps/aper_*.json``, ``ranpac*.json``, ``fecam*.json``): inject a PEFT module (or unfreeze everything), train it
with a cosine classifier over the first task's classes (cross-entropy, SGD, cosine schedule), freeze it, and from
then on only compute statistics of its features. :class:`FirstTaskAdaptation` is that recipe once; the methods differ
in what they build on the adapted features.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cil.backbones import Backbone
from cil.heads import CosineLinear
from cil.layers import freeze_except_peft, inject
from cil.method import CILMethod, FeatureFn
from cil.task import Task

__all__ = ["ADAPTATIONS", "FirstTaskAdaptation"]

ADAPTATIONS: dict[str, dict[str, Any]] = {
    "adapter": {"bottleneck": 64, "scale": 0.1, "dropout": 0.1},
    "vpt_shallow": {"num_tokens": 5, "init": "zeros", "dropout": 0.0},
    "vpt_deep": {"num_tokens": 5, "init": "zeros", "dropout": 0.0},
    "ssf": {"init_std": 0.02, "patch_embed": True, "final_norm": True},
    "finetune": {},
    "none": {},
}
"""Each adaptation's module defaults, as the authors' configs set them (adapter bottleneck 64 = ``ffn_num``; 5 VPT
tokens = ``prompt_token_num``); ``none`` trains nothing (the frozen PTM, as RanPAC's and FeCAM's ``ncm`` runs)."""


class FirstTaskAdaptation(CILMethod):
    """Adapts :meth:`adapted_model` on task 0 with a cosine head, then freezes it; subclasses build on its features
    in :meth:`after_task` (call ``super().after_task`` first).

    Args:
        backbone: The pre-trained model.
        adapt: One of :data:`ADAPTATIONS`.
        epochs: Epochs of first-task adaptation.
        lr: SGD learning rate (cosine-annealed to ``min_lr``).
        momentum: SGD momentum.
        weight_decay: Weight decay.
        peft_options: Overrides of the PEFT module's hyper-parameters (e.g. ``{"bottleneck": 16}``).
        lr_interval: Step the cosine schedule after every ``epoch`` (the authors') or every ``step``.
        min_lr: The schedule's floor (the authors' ``min_lr``; 0 in every config cited here).
    """

    supports_distributed = True
    keeps_ptm: ClassVar[bool] = False
    """Whether the frozen PTM stays next to the adapted model (APER) or is the model adapted (RanPAC, FeCAM)."""

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
        min_lr: float = 0.0,
    ) -> None:
        super().__init__(backbone)
        if lr_interval not in ("epoch", "step"):
            raise ValueError(f"lr_interval must be 'epoch' (the authors') or 'step', got {lr_interval!r}")
        if adapt not in ADAPTATIONS:
            raise ValueError(f"adapt must be one of {sorted(ADAPTATIONS)}, got {adapt!r}")
        self.adapt, self.epochs, self.lr, self.momentum, self.weight_decay = adapt, epochs, lr, momentum, weight_decay
        self.lr_interval, self.min_lr = lr_interval, min_lr
        self.backbone.requires_grad_(False)
        if self.keeps_ptm:
            self.adapted = copy.deepcopy(backbone)
        model = self.adapted_model()
        if adapt == "finetune":
            model.requires_grad_(True)
        elif adapt != "none":
            inject(model, adapt, **{**ADAPTATIONS[adapt], **(peft_options or {})})
            freeze_except_peft(model)
        self.train_head: CosineLinear | None = None
        self.adaptation_done: torch.Tensor
        self.register_buffer("adaptation_done", torch.tensor(adapt == "none"))

    def adapted_model(self) -> nn.Module:
        """The model adaptation tunes: a copy of the PTM where :attr:`keeps_ptm`, the backbone itself otherwise."""
        return self.adapted if self.keeps_ptm else self.backbone

    @property
    def embedding_frozen(self) -> bool:
        return bool(self.adaptation_done)

    def needs_fit(self, task: Task) -> bool:
        return task.index == 0 and self.adapt != "none"

    def trainer_overrides(self, task: Task) -> dict[str, Any]:
        return {"max_epochs": self.epochs}

    def before_task(self, task: Task) -> None:
        if self.needs_fit(task):
            self.train_head = CosineLinear(self.backbone.num_features, task.num_classes).to(self.device)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        assert self.train_head is not None
        x, y = batch
        logits = self.train_head(self.adapted_model()(x))  # [B, C_task0]; labels of task 0 are 0..C-1
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train/acc", (logits.argmax(1) == y).float().mean() * 100, on_epoch=True, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> Any:
        return self.optimizer_with_cosine(
            "sgd", self.lr, self.momentum, self.weight_decay, min_lr=self.min_lr, interval=self.lr_interval
        )

    def after_task(self, task: Task, features: FeatureFn) -> None:
        if task.index == 0 and not bool(self.adaptation_done):
            self.adapted_model().requires_grad_(False)
            self.train_head = None  # only needed to adapt
            self.adaptation_done.fill_(True)
