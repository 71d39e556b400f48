"""EASE: one adapter subspace per task, features concatenated, prototypes of old classes completed in new subspaces.

Zhou, Sun, Ye, Zhan. "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental Learning" (CVPR
2024; arXiv:2403.12030). Facts from the authors' code (``sun-hailong/CVPR24-Ease@6d67508``: ``models/ease.py``,
``backbone/vit_ease.py``, ``backbone/linears.py``, ``exps/ease_*.json``), which LAMDA-PILOT@5240714 ships unchanged.

On a frozen PTM with an AdaptFormer adapter (bottleneck 64, scale 0.1, dropout 0.1) in every block:

1. **Train** a fresh adapter per task ("lora" init: it adds zeros at first) with a fresh cosine head over the task's
   classes (learned scale, from 1); cross-entropy; SGD momentum 0.9, cosine schedule per epoch to 0. The head is
   dropped after the task; the adapter is frozen and kept (task ``t``'s subspace).
2. **Features**: an image's feature is the concatenation of the class token under every task's adapter so far,
   ``[f_0, ..., f_t]`` (``t + 1`` forward passes).
3. **Prototypes**: each new class's mean feature (training images, evaluation transform) in every subspace so far.
   An old class has no image in a newer subspace, so its prototype there is **completed** from the classes that do:
   for old task ``s`` and newer subspace ``d``, ``P[c, d] = sum_j softmax_j(cos(P[c, s], P[j, s])) P[j, d]`` over the
   classes ``j`` of tasks ``d`` onward, the similarity taken in the old task's own subspace ``s``; all completed
   prototypes are recomputed after every task (their ``recalc_sim: true``).
4. **Scores**: ``cos(f_i, P[c, i]) + alpha / t * sum_{j != i} cos(f_j, P[c, j])`` for a class ``c`` of task ``i``
   (``alpha`` 0.1): a class's own subspace counts fully, the others together ``alpha``.

Departures:

- The adapter reads the block's normalised tokens (AdaptFormer's Eq. 3, as our APER and MOS); theirs reads the
  residual stream after attention. On LayerScale ViTs (DINOv2) its output is added after LayerScale.
- Their switches for the plain PTM's feature as an extra subspace (``use_init_ptm``, ``beta``; off in every config),
  the oracle with old data (``use_old_data``), prototypes without completion (``use_diagonal``), the one-shot
  completion (``recalc_sim: false``) and the ADAM-like mode (``moni_adam``) are not implemented.
- Their test classifier keeps a scale ``sigma`` that is never trained (1): left out.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cil.backbones import Backbone
from cil.heads import CosineLinear
from cil.layers import Adapter, FlatPEFT, freeze_except_peft, inject
from cil.method import CILMethod, FeatureFn, register_method
from cil.task import Task

__all__ = ["EASE"]


@register_method("ease")
class EASE(CILMethod):
    """EASE (see the module docstring).

    Args:
        backbone: The pre-trained ViT; frozen, one adapter set per task is trained and kept.
        epochs: Epochs per task (authors: 20).
        lr: SGD learning rate (authors: 0.025 on CIFAR-100, 0.05 on ImageNet-R), cosine-annealed to 0 per epoch.
        momentum: SGD momentum.
        weight_decay: Weight decay (authors: 5e-4 on CIFAR-100, 5e-3 on ImageNet-R).
        bottleneck: Adapter width (authors: 64).
        adapter_scale: Adapter output scale (authors: 0.1).
        alpha: Total weight of the subspaces other than a class's own in its score (authors: 0.1).
    """

    supports_distributed = True  # tests/test_distributed.py

    def __init__(
        self,
        backbone: Backbone,
        epochs: int = 20,
        lr: float = 0.025,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        bottleneck: int = 64,
        adapter_scale: float = 0.1,
        alpha: float = 0.1,
    ) -> None:
        super().__init__(backbone)
        self.epochs, self.lr, self.momentum, self.weight_decay, self.alpha = epochs, lr, momentum, weight_decay, alpha
        inject(self.backbone, "adapter", bottleneck=bottleneck, scale=adapter_scale, dropout=0.1)
        freeze_except_peft(self.backbone)
        self.adapter = FlatPEFT(self.backbone)  # the current task's adapter, as one vector [P]
        self.dim = backbone.num_features
        self.train_head: CosineLinear | None = None
        self.adapter_bank: torch.Tensor  # [T, P] every task's adapter (the subspaces)
        self.prototypes: torch.Tensor  # [C, T, D] each class's prototype in each subspace
        self.register_buffer("adapter_bank", torch.zeros(0, self.adapter.numel()))
        self.register_buffer("prototypes", torch.zeros(0, 0, self.dim))
        self._subspace: int | None = None  # set while `embed` must give one subspace's features [B, D]

    # ---- structure -------------------------------------------------------------------------------------------
    def grow(self, task: Task) -> None:
        super().grow(task)
        self.adapter_bank = torch.cat([self.adapter_bank, self.adapter_bank.new_zeros(1, self.adapter_bank.shape[1])])
        column = self.prototypes.new_zeros(len(self.prototypes), 1, self.dim)
        self.prototypes = torch.cat([self.prototypes, column], dim=1)

    def expand_heads(self, num_new: int) -> None:
        rows = self.prototypes.new_zeros(num_new, self.prototypes.shape[1], self.dim)
        self.prototypes = torch.cat([self.prototypes, rows])

    def trainer_overrides(self, task: Task) -> dict[str, Any]:
        return {"max_epochs": self.epochs}

    def before_task(self, task: Task) -> None:
        if task.index > 0:  # a fresh adapter: the last one is stored in the bank
            for module in self.backbone.modules():
                if isinstance(module, Adapter):
                    module.reset_parameters()
        self.train_head = CosineLinear(self.dim, len(self.new_classes)).to(self.device)

    # ---- training --------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        assert self.train_head is not None
        x, y = batch
        known = len(self.seen_classes) - len(self.new_classes)
        logits = self.train_head(self.backbone(x))  # [B, C_new] under the task's own adapter
        loss = F.cross_entropy(logits, y - known)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train/acc", (logits.argmax(1) == y - known).float().mean() * 100, on_epoch=True, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> Any:
        return self.optimizer_with_cosine("sgd", self.lr, self.momentum, self.weight_decay, interval="epoch")

    # ---- after the task --------------------------------------------------------------------------------------
    def after_task(self, task: Task, features: FeatureFn) -> None:
        self.adapter_bank[task.index] = self.adapter.vector()
        self.train_head = None
        new = list(self.new_classes)
        for subspace in range(task.index + 1):  # the new classes' prototypes in every subspace so far
            self._subspace = subspace
            try:
                embeddings, labels = features(task.train)  # [N, D]
            finally:
                self._subspace = None
            for c in new:
                self.prototypes[c, subspace] = embeddings[labels == c].mean(0).to(self.prototypes)
        self._complete_prototypes()

    @torch.no_grad()
    def _complete_prototypes(self) -> None:
        """Old classes' prototypes in newer subspaces, from the newer classes' prototypes there, weighted by the
        softmax of their cosine similarity to the old class in the old task's subspace (recomputed every task)."""
        owner = torch.as_tensor(self.task_of_class)  # [C]
        for old in range(self.task_index):
            old_classes = torch.nonzero(owner == old).flatten()
            for newer in range(old + 1, self.task_index + 1):
                donors = torch.nonzero(owner >= newer).flatten()
                similarity = F.cosine_similarity(  # [C_old, C_donors], in the old task's subspace
                    self.prototypes[old_classes, old][:, None], self.prototypes[donors, old][None], dim=-1
                )
                weights = similarity.softmax(dim=1)
                self.prototypes[old_classes, newer] = weights @ self.prototypes[donors, newer]

    # ---- inference -------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self._subspace is not None:
            return self.adapter.run_with(self.adapter_bank[self._subspace].to(x.device), x)  # [B, D]
        subspaces = range(len(self.adapter_bank))
        return torch.cat([self.adapter.run_with(self.adapter_bank[j].to(x.device), x) for j in subspaces], dim=-1)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, (t + 1) D]`` -> scores ``[B, C]``: per-subspace cosines, the class's own subspace at weight 1, the
        others at ``alpha / t`` each."""
        subspaces = self.prototypes.shape[1]
        blocks = F.normalize(z.float().view(len(z), subspaces, self.dim), dim=-1)  # [B, T, D]
        prototypes = F.normalize(self.prototypes.to(z.device), dim=-1)  # [C, T, D]
        cosines = torch.einsum("btd,ctd->bct", blocks, prototypes)  # [B, C, T]
        owner = torch.as_tensor(self.task_of_class, device=z.device)  # [C]
        own = F.one_hot(owner, subspaces).to(cosines.dtype)  # [C, T]
        others = self.alpha / max(subspaces - 1, 1)
        weights = own + others * (1 - own)  # [C, T]
        return (cosines * weights).sum(-1)  # [B, C]
