"""SLCA: a slow learner (the whole ViT at a hundredth of the head's learning rate) with classifier alignment.

Zhang, Wang, Kang, Chen, Wei. "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a Pre-trained
Model" (ICCV 2023; arXiv:2303.05118). Facts from the authors' code (``GengDavid/SLCA@169d4e6``: ``models/slca.py``,
``models/base.py``, ``convs/linears.py``, ``convs/vits.py``, ``exps/slca/*.json``) and LAMDA-PILOT's port
(``models/slca.py``, ``exps/slca*.json``).

Per task:

1. **Slow learner**: the whole ViT and one new linear head for the task's classes train with cross-entropy over the
   task's classes (earlier heads frozen); SGD (momentum 0.9, weight decay 5e-4), the backbone at ``lr *
   backbone_lr_scale`` (0.01 x 0.01), the head at ``lr``; the learning rate drops 10x at the milestone epochs.
2. **Class statistics**: each new class's features (training images, evaluation transform, the model just trained)
   give a mean and a full covariance + 1e-4 I (:class:`cil.gaussians.ClassGaussians`, shared with MOS). Earlier
   classes' statistics are never recomputed.
3. **Classifier alignment** (from the second task on): a copy of all heads is trained on 256 features per class drawn
   afresh every epoch from the Gaussians, the means of older tasks' classes shrunk by ``0.9 + 0.1 (t_c + 1) / (t +
   1)``; SGD lr 0.01, cosine schedule; loss: cross-entropy of the logits divided by their norm (the mean over tasks
   of each task's logits' L2 norm) and by the temperature 0.1. The aligned copy scores the test images; the next
   task trains on from the heads *before* alignment (their ``fc.backup()`` / ``fc.recall()``).

Departures:

- The final LayerNorm: their ViT replaces the pre-trained one by a fresh ``nn.LayerNorm`` (weight 1, bias 0;
  ``final_norm: reset``, the default); LAMDA-PILOT's keeps the pre-trained one (``final_norm: pretrained``).
- A class's task is the stream's (``task_of_class``); theirs is ``class // task_size`` with the current task's size,
  the same when all tasks have equal size.
- Their batch 128 (LAMDA-PILOT: 64) and augmentation (ColorJitter, crop scale) are the run's ``data`` settings here.
- Alignment epochs: 5 (the authors; LAMDA-PILOT 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cil.backbones import Backbone
from cil.gaussians import ClassGaussians, align_classifier
from cil.heads import TaskLinearHeads
from cil.method import CILMethod, FeatureFn, register_method
from cil.task import Task

__all__ = ["SLCA"]


@register_method("slca")
class SLCA(CILMethod):
    """SLCA (see the module docstring).

    Args:
        backbone: The pre-trained ViT; all of it trains, slowly.
        epochs: Epochs per task (authors: 20 on CIFAR-100, 50 on ImageNet-R).
        lr: The head's learning rate (authors: 0.01).
        backbone_lr_scale: The backbone's learning rate relative to the head's (authors: 0.01).
        momentum: SGD momentum.
        weight_decay: Weight decay (training and alignment).
        milestones: Epochs after which the learning rate is multiplied by ``lr_decay`` (authors: [18] / [40]).
        lr_decay: The milestones' factor (authors: 0.1).
        align_epochs: Classifier-alignment epochs (authors: 5; LAMDA-PILOT: 3); 0 switches alignment off.
        align_lr: Alignment learning rate (authors: 0.01).
        align_samples_per_class: Features drawn per class and epoch, also the alignment batch size (authors: 256).
        logit_norm: Alignment temperature of the normalised logits (authors: 0.1); None: plain cross-entropy.
        shrink_old_means: Shrink older tasks' means when sampling (the authors' ``0.9 + decay``).
        final_norm: ``reset`` (the authors' code: a fresh final LayerNorm) or ``pretrained`` (LAMDA-PILOT).
    """

    supports_distributed = True  # tests/test_distributed.py

    def __init__(
        self,
        backbone: Backbone,
        epochs: int = 20,
        lr: float = 0.01,
        backbone_lr_scale: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        milestones: Sequence[int] = (18,),
        lr_decay: float = 0.1,
        align_epochs: int = 5,
        align_lr: float = 0.01,
        align_samples_per_class: int = 256,
        logit_norm: float | None = 0.1,
        shrink_old_means: bool = True,
        final_norm: str = "reset",
    ) -> None:
        super().__init__(backbone)
        if final_norm not in ("reset", "pretrained"):
            raise ValueError(f"final_norm must be 'reset' (the authors') or 'pretrained' (PILOT), got {final_norm!r}")
        if logit_norm is not None and logit_norm <= 0:
            raise ValueError(f"logit_norm is a temperature and must be > 0 (or null: off), got {logit_norm}")
        self.epochs, self.lr, self.backbone_lr_scale = epochs, lr, backbone_lr_scale
        self.momentum, self.weight_decay, self.milestones, self.lr_decay = momentum, weight_decay, milestones, lr_decay
        self.align_epochs, self.align_lr, self.align_samples_per_class = align_epochs, align_lr, align_samples_per_class
        self.logit_norm, self.shrink_old_means, self.final_norm = logit_norm, shrink_old_means, final_norm
        if final_norm == "reset":
            norm = getattr(getattr(backbone, "model", backbone), "norm", None)
            if not isinstance(norm, torch.nn.LayerNorm):
                raise ValueError("final_norm: reset needs a ViT with a final LayerNorm (model.norm); set 'pretrained'")
            norm.reset_parameters()
        dim = backbone.num_features
        self.head: TaskLinearHeads = TaskLinearHeads(dim)  # trained task by task, never aligned
        self.aligned = TaskLinearHeads(dim)  # the aligned copy that scores test images
        self.gaussians = ClassGaussians(dim, "full", ridge=1e-4)

    def expand_heads(self, num_new: int) -> None:
        super().expand_heads(num_new)
        self.aligned.expand(num_new)
        self.aligned.requires_grad_(False)  # only trained by alignment
        self.gaussians.expand(num_new)

    def trainer_overrides(self, task: Task) -> dict[str, Any]:
        return {"max_epochs": self.epochs}

    def configure_optimizers(self) -> Any:
        head = [p for p in self.head.parameters() if p.requires_grad]  # the task's own head
        groups = [
            {
                "params": [p for p in self.backbone.parameters() if p.requires_grad],
                "lr": self.lr * self.backbone_lr_scale,
            },
            {"params": head, "lr": self.lr},
        ]
        optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(self.milestones), gamma=self.lr_decay
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        known = len(self.seen_classes) - len(self.new_classes)
        logits = self.head(self.backbone(x))[:, known:]  # [B, C_new]: earlier tasks' heads left out
        loss = F.cross_entropy(logits, y - known)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train/acc", (logits.argmax(1) == y - known).float().mean() * 100, on_epoch=True, batch_size=len(y))
        return loss

    def after_task(self, task: Task, features: FeatureFn) -> None:
        embeddings, labels = features(task.train)  # [N, D] under the model this task trained
        self.gaussians.fit(embeddings, labels, list(self.new_classes))
        self.aligned.load_state_dict(self.head.state_dict())
        if task.index > 0 and self.align_epochs > 0:
            self._align()

    def _align(self) -> None:
        """Classifier alignment of the copy, on the trainer's device (Lightning keeps the module on the CPU
        between fits)."""
        home = self.aligned.device
        self.aligned.to(self.compute_device(home))
        self.aligned.requires_grad_(True)
        try:
            loss = align_classifier(
                self.aligned,
                self.gaussians,
                epochs=self.align_epochs,
                lr=self.align_lr,
                samples_per_class=self.align_samples_per_class,
                batch_size=self.align_samples_per_class,
                weight_decay=self.weight_decay,
                loss_fn=self._alignment_loss,
                mean_scale=self._mean_scale() if self.shrink_old_means else None,
            )
        finally:
            self.aligned.requires_grad_(False)
            self.aligned.to(home)
        self.task_info["align_final_loss"] = round(loss, 4)

    def _mean_scale(self) -> torch.Tensor:
        """``0.9 + 0.1 (t_c + 1) / (t + 1)`` per seen class ``[C]``: 1 for the current task's classes."""
        task_of_class = torch.as_tensor(self.task_of_class, dtype=torch.float64)
        return 0.9 + 0.1 * (task_of_class + 1) / (self.task_index + 1)

    def _alignment_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``logits [B, C]`` divided by their norm (the mean over tasks of each task's logits' L2
        norm, + 1e-7) and by the temperature; plain cross-entropy without ``logit_norm``."""
        if self.logit_norm is None:
            return F.cross_entropy(logits, targets)
        norms = torch.stack([part.norm(dim=1) + 1e-7 for part in logits.split(self.aligned.sizes, dim=1)])  # [T, B]
        return F.cross_entropy(logits / norms.mean(0)[:, None] / self.logit_norm, targets)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.aligned(z)  # [B, C_seen]
