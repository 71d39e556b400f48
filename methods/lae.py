"""LAE: learning, accumulation and ensemble of parameter-efficient modules (adapter, LoRA or prefix).

Gao, Sun, Wang, Hu, Gong, Zhang. "A Unified Continual Learning Framework with General Parameter-Efficient Tuning"
(ICCV 2023; arXiv:2303.10070). Facts (placement, sizes, schedule, EMA, ensemble) from the paper and the authors'
code (``gqk/LAE``).

- **Learning**: an *online* PET module in the first five blocks of the frozen ViT (adapter with bottleneck 5 beside
  the attention, LoRA of rank 5 on K and V, or prefixes of length 10) and a linear head that grows per task are
  trained with cross-entropy over the current task's classes only (old logits masked), Adam, constant lr. The
  online module is never reset between tasks.
- **Calibration of learning speed**: from the second task on, the PET module is frozen for the first
  ``freeze_epochs`` epochs (CIFAR-100: 3 of 5, ImageNet-R: 30 of 50), so the new classes' head catches up before
  the shared module moves.
- **Accumulation**: after the first task an *offline* module is born as a copy of the online one and, after every
  later training step, follows it as an exponential moving average ``off <- d off + (1 - d) on`` (``d = 0.9999``).
- **Ensemble**: at test time the online and the offline model (the same head) each give a softmax over all seen
  classes; the prediction is the class with the larger of the two, elementwise (returned as log-probabilities).

Each step also records the online-only, offline-only and ensemble accuracy over all seen test sets
(``tasks.csv``: ``online_acc``, ``offline_acc``, ``ensemble_acc``), so one run compares the three. After the first
task the offline module does not exist yet, and all three are the online model (as ``inference: offline`` is).

PET modules as the authors' code builds them (``libml/model/pet``): the adapter is ``up(GELU(down(h)))`` times a
scalar learned from 1, LoRA's update on K and on V each has a scalar learned from ``alpha / rank = 1``
(``pet_options: {activation: relu, learn_scale: false}`` / ``{learn_scale: false}`` give AdaptFormer's fixed-scale
ReLU adapter and plain LoRA instead); prefixes start from U(0, 0.01), keys and values each have a scalar learned
from 1, and the attention on the prefix is renormalised to sum to 1 (``compensate``; see
:class:`cil.layers.PrefixAttention`). The linear head's new rows start from N(0, 0.001) as theirs.
``benchmarks/reference/lae_side_by_side.py`` runs their code beside this one (``docs/reproduction.md``).

The learning rate is theirs for batch 24 (``0.03 x 24 / 256`` on CIFAR);
scale it with the batch size if you change ``data.batch_size``. Inputs come from the engine, not from their
pipeline: theirs are [0, 1] pixels without normalisation (``main.py`` builds ``build_imagenet_transform(norm=False)``),
random-resized crops of scale (0.08, 1) for training and Resize(256) + CenterCrop(224) for testing
(``libml/data/transform.py``); the engine normalises with the backbone's mean and std, crops with scale (0.7, 1) and
resizes the whole image for testing (``cil/data.py``). Their matmuls run in TF32
(``torch.set_float32_matmul_precision("medium")`` in ``libml/core/abc.py``).

LAMDA-PILOT's LAE (``models/lae.py`` at 5240714) is not the authors' and is not a reference for this one: its adapter
is attached where the attention never reads it (head-only training), its LoRA variant raises, it freezes the PET
module in the first epochs of the first task too, and its offline module starts from the random initial PET and
follows it from the first step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cil._distributed import sum_counts_over_ranks
from cil.backbones import Backbone
from cil.heads import IncrementalLinear
from cil.layers import FlatPEFT, freeze_except_peft, inject, vit_blocks
from cil.method import CILMethod, FeatureFn, register_method
from cil.task import Task

__all__ = ["LAE", "ema_update"]

_PET_DEFAULTS: dict[str, dict[str, Any]] = {
    "adapter": {
        "bottleneck": 5,
        "scale": 1.0,
        "dropout": 0.0,
        "position": "attn",
        "activation": "gelu",
        "learn_scale": True,
    },
    "lora": {"rank": 5, "alpha": 5.0, "targets": ("k", "v"), "learn_scale": True},
    "prefix": {"length": 10, "init_bounds": (0.0, 0.01), "learn_scale": True, "compensate": True},
}
_INFERENCE = ("ensemble", "online", "offline")


def ema_update(offline: torch.Tensor, online: torch.Tensor, decay: float) -> torch.Tensor:
    """``offline <- decay * offline + (1 - decay) * online``, in place; returns ``offline``."""
    return offline.mul_(decay).add_(online.to(offline), alpha=1.0 - decay)


@register_method("lae")
class LAE(CILMethod):
    """LAE over one PET kind (see the module docstring).

    Args:
        backbone: The pre-trained ViT; frozen, the online PET module is injected into it.
        pet: ``adapter``, ``lora`` or ``prefix``.
        blocks: The blocks that get a PET module (default: the first five, as the authors).
        epochs: Epochs per task.
        freeze_epochs: Epochs at the start of every task after the first in which only the head trains.
        lr: Adam learning rate (constant).
        weight_decay: Adam weight decay (authors: 0).
        ema_decay: Decay of the offline module's moving average.
        inference: ``ensemble`` (authors), ``online`` or ``offline`` (both parts alone, for ablations).
        pet_options: Overrides of the PET module's hyper-parameters (e.g. ``{"rank": 8}``).
    """

    supports_distributed = True

    def __init__(
        self,
        backbone: Backbone,
        pet: str = "adapter",
        blocks: list[int] | None = None,
        epochs: int = 5,
        freeze_epochs: int = 3,
        lr: float = 0.0028125,
        weight_decay: float = 0.0,
        ema_decay: float = 0.9999,
        inference: str = "ensemble",
        pet_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(backbone)
        if pet not in _PET_DEFAULTS:
            raise ValueError(f"pet must be one of {sorted(_PET_DEFAULTS)}, got {pet!r}")
        if inference not in _INFERENCE:
            raise ValueError(f"inference must be one of {list(_INFERENCE)}, got {inference!r}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        self.pet, self.epochs, self.freeze_epochs, self.lr = pet, epochs, freeze_epochs, lr
        self.weight_decay, self.ema_decay, self.inference = weight_decay, ema_decay, inference
        blocks = list(range(min(5, len(vit_blocks(backbone.model))))) if blocks is None else list(blocks)
        inject(self.backbone, pet, blocks, **{**_PET_DEFAULTS[pet], **(pet_options or {})})
        freeze_except_peft(self.backbone)
        self.online = FlatPEFT(self.backbone)
        self.head: IncrementalLinear = IncrementalLinear(backbone.num_features)
        self.offline: torch.Tensor  # [P] the accumulated PET module; zeros until it is born after the first task
        self.offline_born: torch.Tensor
        self.register_buffer("offline", torch.zeros(self.online.numel()))
        self.register_buffer("offline_born", torch.tensor(False))
        self._counts = torch.zeros(4, dtype=torch.long)  # online, offline, ensemble correct; images
        self._counts_before = self._counts.clone()  # at the start of the current prediction

    # ---- per task --------------------------------------------------------------------------------------------
    def expand_heads(self, num_new: int) -> None:
        super().expand_heads(num_new)
        with torch.no_grad():  # the authors' init of a new task's classifier
            self.head.weight[-num_new:].normal_(0.0, 0.001)
            self.head.bias[-num_new:].zero_()

    def before_task(self, task: Task) -> None:
        if task.index > 0 and not bool(self.offline_born):
            self.offline.copy_(self.online.vector())  # the offline module starts as the first task's online one
            self.offline_born.fill_(True)

    def trainer_overrides(self, task: Task) -> dict[str, Any]:
        return {"max_epochs": self.epochs}

    def pet_frozen(self) -> bool:
        """Learning-speed calibration: the head alone for the first epochs of every task after the first."""
        return self.task_index > 0 and self.current_epoch < self.freeze_epochs

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A frozen PET module's gradients are dropped before the step, so Adam skips it as it skips the authors'
        ``requires_grad=False`` parameters (no update, no moment or step-count change). Its parameters keep
        ``requires_grad``: DDP needs the same trainable parameters, all used, in every step of a fit."""
        if self.pet_frozen():
            for param in self.online.parameters():
                param.grad = None

    def configure_optimizers(self) -> Any:
        params = [*self.head.parameters(), *self.online.parameters()]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        known = len(self.seen_classes) - len(self.new_classes)
        logits = self.head(self.backbone(x))[:, known:]  # [B, C_new]: old classes' logits masked out
        loss = F.cross_entropy(logits, y - known)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train/acc", (logits.argmax(1) == y - known).float().mean() * 100, on_epoch=True, batch_size=len(y))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Accumulation after every optimiser step, also while the PET module is frozen (as the authors)."""
        if bool(self.offline_born):
            ema_update(self.offline, self.online.vector(), self.ema_decay)

    def after_task(self, task: Task, features: FeatureFn) -> None:
        self._counts.zero_()  # counted during the evaluation that follows

    # ---- inference -------------------------------------------------------------------------------------------
    def _both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-softmax of the online and (once born) the offline model over the seen classes, ``[B, C]`` each."""
        online = F.log_softmax(self.head(self.backbone(x)).float(), dim=1)
        if not bool(self.offline_born):
            return online, None
        offline = F.log_softmax(self.head(self.online.run_with(self.offline, x)).float(), dim=1)
        return online, offline

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        online, offline = self._both(x)
        return self._choose(online, offline, self.inference)

    @staticmethod
    def _choose(online: torch.Tensor, offline: torch.Tensor | None, inference: str) -> torch.Tensor:
        if offline is None or inference == "online":
            return online
        if inference == "offline":
            return offline
        return torch.maximum(online, offline)  # elementwise max of the two softmaxes (in log space)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.predict_output != "logits":  # embeddings, or the retention probe's backbone features
            return super().predict_step(batch, batch_idx, dataloader_idx)
        x, y = batch
        online, offline = self._both(x)
        y = y.to(online.device)
        correct = [
            (self._choose(online, offline, rule).argmax(1) == y).sum() for rule in ("online", "offline", "ensemble")
        ]
        self._counts += torch.stack([*correct, torch.tensor(len(y), device=y.device)]).cpu()
        return self._choose(online, offline, self.inference), y

    def on_predict_epoch_start(self) -> None:
        self._counts_before = self._counts.clone()

    def on_predict_epoch_end(self) -> None:
        """The three accuracies so far, over every rank's shard of this prediction."""
        scored = sum_counts_over_ranks(self._counts - self._counts_before, self.device)
        self._counts.copy_(self._counts_before + scored)  # in place: this runs in inference mode
        online_right, offline_right, ensemble_right, total = self._counts.tolist()
        if total:
            self.task_info["online_acc"] = round(100.0 * online_right / total, 4)
            self.task_info["offline_acc"] = round(100.0 * offline_right / total, 4)
            self.task_info["ensemble_acc"] = round(100.0 * ensemble_right / total, 4)


def _variant(name: str, pet: str) -> type[LAE]:
    """A registered LAE subclass with ``pet`` fixed, so configs name the variant by class."""

    def __init__(  # noqa: N807 - becomes the subclass's __init__
        self: LAE,
        backbone: Backbone,
        blocks: list[int] | None = None,
        epochs: int = 5,
        freeze_epochs: int = 3,
        lr: float = 0.0028125,
        weight_decay: float = 0.0,
        ema_decay: float = 0.9999,
        inference: str = "ensemble",
        pet_options: dict[str, Any] | None = None,
    ) -> None:
        LAE.__init__(
            self, backbone, pet, blocks, epochs, freeze_epochs, lr, weight_decay, ema_decay, inference, pet_options
        )

    cls = type(name, (LAE,), {"__init__": __init__, "__doc__": f"LAE with a {pet} PET module."})
    cls.__module__ = __name__
    return register_method(f"lae_{pet}")(cls)


LAEAdapter = _variant("LAEAdapter", "adapter")
LAELoRA = _variant("LAELoRA", "lora")
LAEPrefix = _variant("LAEPrefix", "prefix")
