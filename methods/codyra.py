"""CoDyRA: rank-selective LoRA, merged into the pre-trained model after every task.

Lu et al., "Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models
with Dynamic Rank-Selective LoRA" (arXiv 2412.01004); facts from the authors' code (Artificer-AI-Lab/CoDyRA).

Per task: fresh LoRA modules ``Delta W = B diag(w) A`` (rank 16, ``B = 0``, ``A`` Kaiming-uniform, gates ``w ~
N(0, 1)``, no alpha/r scaling) on the q, k, v, attention-output and MLP projections of every block; AdamW (betas
0.9 / 0.9999, lr 5e-4, cosine). The first half of the task's optimiser steps is dense; then, after every step, the
gates go through the proximal operator of the L1 penalty, soft-thresholding ``T_k(w) = sign(w) max(|w| - k, 0)``,
with ``k`` raised in 50 equal levels from 0 to ``kappa_max``. Ranks whose gate reaches zero are dropped, so every
layer ends the task with its own rank (``tasks.csv``: ``rank/<layer>`` columns; ``cil.plots.selected_ranks``).
After the task the surviving update is merged into the weights and the LoRA modules are removed: between tasks,
and at evaluation, the model has exactly the pre-trained architecture and parameter count.

Departures:

* With a timm ViT (vision only), the classifier is a linear head over the backbone's embedding, trained with
  cross-entropy over the task's new classes (earlier classes are excluded from the softmax, as the authors mask them
  with -inf). With a CLIP backbone (``backbone.name: open_clip/ViT-B-16``) it is the paper's: LoRA in the image and
  text transformers, logits ``logit_scale * cos(image, text("a photo of a {class}."))`` with the current task's text
  embeddings recomputed every step. The authors also add a text-to-image cross-entropy term; we train with the
  image-to-text one only.
* Thresholding is the paper's soft-threshold. The authors' code shrinks by ``k`` and then also zeroes every gate
  below ``k``, so in effect only gates above ``2k`` survive (as ``|w| - k``).
* ``kappa_max`` is an absolute threshold per step, as in the code (the paper writes the operator without saying
  how ``k`` relates to the L1 weight and the step size). The authors train 500 iterations per task; shorter tasks
  need a larger ``kappa_max`` for the same total shrinkage (configs/experiments/codyra_offline.yaml says how much).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cil.backbones import Backbone
from cil.clip import ClassNameHead, class_prompts
from cil.heads import IncrementalLinear
from cil.layers import LoRALinear, inject, inject_lora_open_clip, unload_lora
from cil.method import CILMethod, FeatureFn, register_method
from cil.task import Task


@register_method("rank_selective_lora")  # an alias: runs and tables name it codyra (registered first, below)
@register_method("codyra")
class CoDyRA(CILMethod):
    """Rank-selective LoRA (CoDyRA), merged after every task; ``rank_selection=False`` is plain LoRA of the same
    rank, merged the same way (the ablation without gates).

    Args:
        backbone: A timm ViT (LoRA is injected into its blocks).
        rank: LoRA rank per target (the gate budget).
        targets: Projections that get LoRA: any of q, k, v, proj, fc1, fc2.
        layers: Blocks that get LoRA (default: all).
        rank_selection: Learn a gate per rank and prune it by soft-thresholding (CoDyRA); False: plain LoRA.
        kappa_max: Final soft-threshold per optimiser step.
        dense_fraction: Share of each task's steps before thresholding starts.
        threshold_levels: Number of equal steps in which the threshold rises to ``kappa_max``.
        lr: AdamW learning rate (cosine-annealed over the task).
        weight_decay: AdamW weight decay.
        epochs: Epochs per task.
        steps: Optimiser steps per task instead of epochs (the authors train 500 iterations per task).
        template: CLIP only: the prompt whose text embedding represents a class, where the task has none of its own
            (a stream task's ``prompt:``, see :func:`cil.clip.class_prompts`).
        towers: CLIP only: the transformers that get LoRA (``visual``, ``text``).
    """

    supports_distributed = True
    supported_scenarios = ("class_incremental", "domain_incremental")  # the loss covers the current task's classes

    def __init__(
        self,
        backbone: Backbone,
        rank: int = 16,
        targets: Sequence[str] = ("q", "k", "v", "proj", "fc1", "fc2"),
        layers: Sequence[int] | None = None,
        rank_selection: bool = True,
        kappa_max: float = 0.005,
        dense_fraction: float = 0.5,
        threshold_levels: int = 50,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        epochs: int = 10,
        steps: int | None = None,
        template: str = "a photo of a {}.",
        towers: Sequence[str] = ("visual", "text"),
    ) -> None:
        super().__init__(backbone)
        if not 0.0 <= dense_fraction < 1.0:
            raise ValueError(f"dense_fraction must be in [0, 1), got {dense_fraction}")
        self.rank, self.targets, self.layers = rank, tuple(targets), None if layers is None else list(layers)
        self.rank_selection, self.kappa_max = rank_selection, kappa_max
        self.dense_fraction, self.threshold_levels = dense_fraction, threshold_levels
        self.lr, self.weight_decay, self.epochs, self.steps = lr, weight_decay, epochs, steps
        self.towers = tuple(towers)
        self.backbone.requires_grad_(False)
        self.clip = getattr(backbone, "clip", None)
        self.head: IncrementalLinear | ClassNameHead = (
            IncrementalLinear(backbone.num_features)
            if self.clip is None
            else ClassNameHead(self.clip, backbone.tokenizer, template)
        )
        self.lora: list[LoRALinear] = []
        self.task_classes = slice(0, 0)  # the current task's classes (contiguous global ids), set by before_task

    @property
    def scores_unseen(self) -> bool:
        return isinstance(self.head, ClassNameHead)  # CLIP scores any class by the text embedding of its name

    def zero_shot_prompts(self, tasks: Sequence[Task]) -> list[str]:
        if not isinstance(self.head, ClassNameHead):
            return super().zero_shot_prompts(tasks)
        return class_prompts(tasks, self.head.template)

    def zero_shot_classifier(self, tasks: Sequence[Task]) -> Callable[[torch.Tensor], torch.Tensor]:
        if not isinstance(self.head, ClassNameHead):
            return super().zero_shot_classifier(tasks)
        head, prompts = self.head, self.zero_shot_prompts(tasks)
        with torch.no_grad(), self.evaluating():
            text = torch.cat([head.encode(prompts[i : i + 512]) for i in range(0, len(prompts), 512)])  # [C, E]
        return lambda z: head.logits(z, text)

    # ---- per task --------------------------------------------------------------------------------------------
    def grow(self, task: Task) -> None:
        super().grow(task)
        if isinstance(self.head, ClassNameHead):
            prompt_of = dict(zip(task.classes, class_prompts([task], self.head.template), strict=True))
            self.head.prompts += [prompt_of[c] for c in self.new_classes]

    def trainer_overrides(self, task: Task) -> dict[str, Any]:
        return {"max_epochs": self.epochs} if self.steps is None else {"max_steps": self.steps, "max_epochs": -1}

    def before_task(self, task: Task) -> None:
        """Fresh LoRA modules (the previous task's update is already part of the weights)."""
        self.task_classes = slice(task.classes[0], task.classes[-1] + 1)
        options: dict[str, Any] = {"rank": self.rank, "alpha": float(self.rank), "gated": self.rank_selection}
        if self.clip is not None:
            modules = inject_lora_open_clip(self.clip, self.targets, towers=self.towers, **options)
        else:
            modules = inject(self.backbone, "lora", self.layers, targets=self.targets, **options)
        self.lora = [m.to(self.device) for m in modules if isinstance(m, LoRALinear)]

    def configure_optimizers(self) -> Any:
        params = [p for m in self.lora for p in m.own_parameters()] + list(self.head.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.9999), weight_decay=self.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        own = self.task_classes
        if isinstance(self.head, ClassNameHead):  # the task's text embeddings, through the text LoRA
            logits = self.head.logits(self.embed(x), self.head.encode(self.head.prompts[own]))
        else:
            logits = self(x)[:, own]  # [B, C_task]: earlier tasks' classes take no part in this task's softmax
        loss = F.cross_entropy(logits, y - own.start)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def threshold(self, step: int, total: int) -> float:
        """The soft-threshold after optimiser step ``step`` (0-based) of ``total``: 0 while dense, then rising in
        ``threshold_levels`` equal levels to ``kappa_max``, spread evenly over the sparse steps."""
        dense = int(self.dense_fraction * total)
        if step < dense:
            return 0.0
        levels = max(1, self.threshold_levels)
        level = min(levels, 1 + (step - dense) * levels // max(1, total - dense))  # 1..levels
        return self.kappa_max * level / levels

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.rank_selection:
            # inside optimizer_step Lightning has not counted this step yet: global_step is its 0-based index
            kappa = self.threshold(self.trainer.global_step, int(self.trainer.estimated_stepping_batches))
            if kappa > 0:
                for module in self.lora:
                    module.soft_threshold_(kappa)

    def after_task(self, task: Task, features: FeatureFn) -> None:
        """Records each layer's selected rank, then merges the update into the weights and removes the modules."""
        names = {id(module): name for name, module in self.backbone.named_modules()}
        ranks: list[int] = []
        for module in self.lora:
            for target, rank in module.active_ranks().items():
                label = names[id(module)].removeprefix("model.").replace(".parametrizations.", ".")
                label = label.removesuffix(".0.lora")  # open_clip: <block>.attn.in_proj_weight
                self.task_info[f"rank/{label}.{target}" if target != "all" else f"rank/{label}"] = rank
                ranks.append(rank)
        self.task_info["mean_rank"] = sum(ranks) / max(1, len(ranks))
        unload_lora(self.backbone)
        self.lora = []
        if isinstance(self.head, ClassNameHead):
            self.head.refresh()  # the seen classes' text embeddings under the merged text tower
