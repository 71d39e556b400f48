"""MOS: model surgery with task adapters, adapter merging, classifier alignment and self-refined adapter retrieval.

Sun, Zhou, Zhan, Ye. "MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental Learning" (AAAI 2025;
arXiv:2412.09441). Facts (order of operations, losses, hyper-parameters) from the paper and the authors' code
(``sun-hailong/AAAI25-MOS``, the same file as ``models/mos.py`` in LAMDA-PILOT).

Per task ``t``, on a frozen PTM with an AdaptFormer adapter (bottleneck 16) in every block:

1. **Train** the running adapter, warm-started from the previous task's, and a linear head over all seen classes
   (the head at 0.1x the adapter's learning rate) with cross-entropy over the *new* classes only (old logits are
   masked), plus the authors' auxiliary contrastive term: the batch's features against each other and against the
   stored means of the old classes, ``CE(M M^T / 0.8, identity)`` with ``M = [old means; batch features]``,
   weight 0.1. SGD, momentum 0.9, cosine schedule over epochs.
2. **Adapter merging**: after every optimiser step of task ``t > 0`` the running adapter is pulled toward the mean
   of the previous tasks' adapters, ``A <- (1 - m) A + m mean(A_0..A_{t-1})``, so that adapters of different tasks
   stay compatible with one head. At the end of the task the adapter is stored as task ``t``'s. The paper's
   momentum is 0.1, but the authors' code applies it 13 times per step of a 12-block ViT (see below), so the
   default ``merge_momentum`` is ``1 - 0.9^13 = 0.7458``, one pull of 0.1 per block and one after the step.
3. **Class statistics and classifier alignment**: each new class's features are summarised by a Gaussian (mean,
   covariance + 1e-4 I). With ``statistics_adapter: pulled`` (default, the authors' code: their ``_compute_mean``
   runs the ViT in its training mode) every forward of this pass pulls the running adapter toward the mean of
   adapters ``0..t-1`` once per block, in place, so for ``t >= 1`` the Gaussians are computed under a near-mean
   adapter, and the next task warm-starts from it; ``task`` uses task ``t``'s adapter for both. The pass runs class
   by class in class order, in batches of ``data.eval_batch_size`` (theirs: 3 x batch size; the number of forwards
   sets how far the pulls go). For ``t > 0`` the head is then re-trained for 30 epochs (SGD lr 0.005, cosine) on
   features sampled from the Gaussians of all seen classes. No image is kept.
4. **Prototypes**: each class's mean feature under the *first* task's adapter (the authors' "original" branch),
   classified by cosine similarity.
5. **Self-refined adapter retrieval** at test time: the prototype prediction names a task; its adapter embeds the
   image and the head predicts again, which names a task again; this repeats until the task stops changing or after
   ``max_refine`` (4) head evaluations. The final scores ensemble both branches:
   ``softmax(head logits) + softmax((t + 1) * prototype cosine)``, returned as log-probabilities.

Departures from the authors' code, each deliberate:

- Training: their merge runs in place inside the ViT's block loop, so in every training forward block ``l`` runs
  with the adapter after ``l + 1`` pulls and the step lands on the adapter pulled 12 times, then one more pull
  follows. We take the step on the unpulled adapter and apply one pull of strength ``merge_momentum`` after it. Both
  contract ``A - M`` by ``0.9^13`` per step, but their gradient step is scaled by 0.9 and ours by 0.254 (their
  effective adapter learning rate is 3.5x ours), and their gradient is taken at the pulled adapters.
  ``merge_momentum: 0.1`` is the paper's value applied once per step; on the offline stream it is 12 points of Ā
  worse (benchmarks/mos_table.py).
- Test time: their evaluation pulls *stored* adapter ``t`` in place toward the mean of adapters ``0..t-1`` (12
  pulls per forward, kept across batches and tasks), so after a few test batches adapter ``t`` is close to that
  mean and the scores depend on how many batches were evaluated before. We never modify stored adapters: each task
  keeps its own.
- The adapter reads the block's normalised tokens (AdaptFormer's Eq. 3, as in our APER); theirs reads the residual
  stream. On LayerScale ViTs (DINOv2) its output is added after LayerScale.
- The cosine schedule of the adapter's training steps per epoch, as theirs; alignment samples
  ``align_samples_per_class`` features per class and epoch (theirs: 5 x batch size) in batches of the same size.
- Inputs are normalised with the backbone's mean / std (theirs feed [0, 1] pixels to a model trained on normalised
  ones).
- The head is one linear layer that grows per task; theirs is sized for all classes of the dataset from the start
  (the rows of future classes are masked out, but weight decay shrinks them until their task begins). New rows
  start as timm's ViT head does (truncated normal, std 0.02, zero bias), as theirs; ``head_init: default`` uses
  PyTorch's ``nn.Linear`` init.
- Minor: cosine schedules end at 0, as their ``min_lr: 0`` (all 14 exps/*.json); full covariances cost ``D^2``
  floats per class in every checkpoint (2.4 MB per class at D = 768); ``covariance: diagonal`` stores ``D``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from cil._distributed import sum_counts_over_ranks
from cil.backbones import Backbone
from cil.gaussians import ClassGaussians, align_classifier
from cil.heads import HEAD_INITS, IncrementalLinear, PrototypeHead
from cil.layers import FlatPEFT, freeze_except_peft, inject, vit_blocks
from cil.method import CILMethod, FeatureFn, register_method
from cil.task import Task, dataset_targets

__all__ = ["MOS"]


@register_method("mos")
class MOS(CILMethod):
    """MOS (see the module docstring); every part can be switched off for ablations.

    Args:
        backbone: The pre-trained ViT; frozen, adapters are injected into it.
        epochs: Training epochs per task.
        lr: SGD learning rate of the adapter; the head uses ``head_lr_scale * lr``.
        head_lr_scale: The head's learning rate relative to the adapter's (authors: 0.1).
        momentum: SGD momentum.
        weight_decay: Weight decay (adapter, head and alignment).
        bottleneck: Adapter bottleneck width (authors: 16).
        adapter_scale: Adapter output scale (authors: 0.1).
        merge_momentum: Pull toward the mean of earlier adapters after each step (the authors' effective
            ``1 - 0.9^13``); 0 switches merging off.
        orth_weight: Weight of the auxiliary contrastive term; 0 switches it off.
        orth_temperature: Its temperature (authors: 0.8).
        align: Re-train the head on features sampled from the classes' Gaussians after every task ``t > 0``.
        align_epochs: Alignment epochs (authors: 30).
        align_lr: Alignment learning rate (authors: 0.005).
        align_samples_per_class: Sampled features per class and epoch, also the alignment batch size.
        covariance: ``full`` (authors' default) or ``diagonal`` (their ImageNet-A setting; D floats per class).
        retrieval: Pick each test image's adapter by self-refined retrieval; if False, every image is embedded
            with the newest task's adapter.
        max_refine: Head evaluations of the retrieval loop (authors: 4); 1 is one-shot retrieval from the
            prototype prediction.
        ensemble: Add the prototype branch's softmax to the head's (authors: on).
        prototype_adapter: ``first`` (the first task's adapter, as the authors) or ``none`` (the plain PTM).
        statistics_adapter: The adapter the class Gaussians are computed under: ``pulled`` (the authors' code,
            see the module docstring) or ``task`` (task ``t``'s own adapter, and the next task starts from it).
        head_init: New head rows' init: ``trunc_normal`` (timm's, as the authors) or ``default`` (PyTorch's).
    """

    supports_distributed = True  # except with statistics_adapter: pulled (distributed_blocker)

    def __init__(
        self,
        backbone: Backbone,
        epochs: int = 20,
        lr: float = 0.03,
        head_lr_scale: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        bottleneck: int = 16,
        adapter_scale: float = 0.1,
        merge_momentum: float = 1 - 0.9**13,
        orth_weight: float = 0.1,
        orth_temperature: float = 0.8,
        align: bool = True,
        align_epochs: int = 30,
        align_lr: float = 0.005,
        align_samples_per_class: int = 240,
        covariance: str = "full",
        retrieval: bool = True,
        max_refine: int = 4,
        ensemble: bool = True,
        prototype_adapter: str = "first",
        statistics_adapter: str = "pulled",
        head_init: str = "trunc_normal",
    ) -> None:
        super().__init__(backbone)
        if prototype_adapter not in ("first", "none"):
            raise ValueError(f"prototype_adapter must be 'first' or 'none', got {prototype_adapter!r}")
        if max_refine < 1:
            raise ValueError(f"max_refine counts head evaluations and must be >= 1, got {max_refine}")
        if not 0.0 <= merge_momentum < 1.0:
            raise ValueError(f"merge_momentum must be in [0, 1), got {merge_momentum}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        if statistics_adapter not in ("pulled", "task"):
            raise ValueError(f"statistics_adapter must be 'pulled' or 'task', got {statistics_adapter!r}")
        self.epochs, self.lr, self.head_lr_scale = epochs, lr, head_lr_scale
        self.momentum, self.weight_decay = momentum, weight_decay
        self.merge_momentum, self.orth_weight, self.orth_temperature = merge_momentum, orth_weight, orth_temperature
        self.align, self.align_epochs, self.align_lr = align, align_epochs, align_lr
        self.align_samples_per_class, self.covariance = align_samples_per_class, covariance
        self.retrieval, self.max_refine, self.ensemble = retrieval, max_refine, ensemble
        self.prototype_adapter, self.statistics_adapter = prototype_adapter, statistics_adapter

        inject(self.backbone, "adapter", bottleneck=bottleneck, scale=adapter_scale, dropout=0.1)
        freeze_except_peft(self.backbone)
        self.adapter = FlatPEFT(self.backbone)  # the running adapter, as one vector [P]
        width = self.adapter.numel()
        dim = backbone.num_features
        self.head: IncrementalLinear = IncrementalLinear(
            dim, init=head_init
        )  # trained with the adapters, then by alignment
        self.prototypes = PrototypeHead(dim)  # cosine to class means under the prototype adapter
        self.adapter_bank: torch.Tensor  # [T, P] every finished task's adapter, flattened
        self.class_task: torch.Tensor  # [C] the task that introduced each class
        self.register_buffer("adapter_bank", torch.zeros(0, width))
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long))
        self.gaussians = ClassGaussians(dim, covariance, ridge=1e-4)  # every seen class's features: mean, covariance
        self._embed_adapter: torch.Tensor | None = None  # flattened adapter `embed` uses; None: the running one
        self._pull: _PullSchedule | None = None  # set while class statistics are computed under pulled adapters
        self._retrieval_counts = torch.zeros(3, dtype=torch.long)  # retrieved right, first guess right, images
        self._counts_before = self._retrieval_counts.clone()  # at the start of the current prediction

    # ---- structure -------------------------------------------------------------------------------------------
    def grow(self, task: Task) -> None:
        super().grow(task)
        self.adapter_bank = torch.cat([self.adapter_bank, self.adapter_bank.new_zeros(1, self.adapter_bank.shape[1])])
        new = torch.full((task.num_classes,), task.index, dtype=torch.long, device=self.class_task.device)
        self.class_task = torch.cat([self.class_task, new])

    def expand_heads(self, num_new: int) -> None:
        super().expand_heads(num_new)
        self.prototypes.expand(num_new)
        self.gaussians.expand(num_new)

    def trainer_overrides(self, task: Task) -> dict[str, Any]:
        return {"max_epochs": self.epochs}

    # ---- training --------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        groups = [
            {"params": self.adapter.parameters(), "lr": self.lr},
            {"params": list(self.head.parameters()), "lr": self.lr * self.head_lr_scale},
        ]
        optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.epochs), eta_min=0.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        known = len(self.seen_classes) - len(self.new_classes)
        z = self.backbone(x)  # [B, D] under the running adapter
        logits = self.head(z)[:, known:]  # [B, C_new]: old classes' logits masked out
        loss = F.cross_entropy(logits, y - known)
        self.log("train/ce", loss, on_epoch=True, batch_size=len(y))
        if self.orth_weight > 0:
            orth = self._contrastive(z, known)
            self.log("train/orth", orth, on_epoch=True, batch_size=len(y))
            loss = loss + self.orth_weight * orth
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train/acc", (logits.argmax(1) == y - known).float().mean() * 100, on_epoch=True, batch_size=len(y))
        return loss

    def _contrastive(self, z: torch.Tensor, known: int) -> torch.Tensor:
        """The authors' auxiliary term: every row of ``M = [old class means; z]`` must be most similar to itself.
        In float32 even under bf16 autocast: unnormalised similarities reach the thousands."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            M = torch.cat([self.gaussians.means[:known].to(z.device), z.float()])  # [C_old + B, D]; means: no gradient
            similarity = M @ M.T / self.orth_temperature  # [C_old + B, C_old + B]
            return F.cross_entropy(similarity, torch.arange(len(M), device=z.device))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Adapter merging, once per optimiser step (not per micro-batch under gradient accumulation)."""
        if self.task_index > 0 and self.merge_momentum > 0:
            self._merge_toward_previous()

    def _merge_toward_previous(self) -> None:
        """``A <- (1 - m) A + m mean(A_0..A_{t-1})`` on the running adapter."""
        self.adapter.lerp_(self.adapter_bank[: self.task_index].mean(dim=0), self.merge_momentum)

    # ---- after the task --------------------------------------------------------------------------------------
    def after_task(self, task: Task, features: FeatureFn) -> None:
        self.adapter_bank[task.index] = self.adapter.vector()
        if self.statistics_adapter == "pulled" and task.index > 0 and self.merge_momentum > 0:
            embeddings, labels = self._pulled_embeddings(task, features)
        else:
            embeddings, labels = features(task.train)  # [N, D] under this task's adapter
        self.gaussians.fit(embeddings, labels, list(task.classes))
        if self.align and task.index > 0:
            self._align_classifier()
        if self.prototype_adapter == "first" and task.index == 0:
            proto_embeddings = embeddings
        else:
            self._embed_adapter = self._prototype_vector()
            try:
                proto_embeddings, labels = features(task.train)
            finally:
                self._embed_adapter = None
        self.prototypes.set_prototypes(proto_embeddings, labels, list(task.classes))
        self._retrieval_counts.zero_()  # counted during the evaluation that follows

    def _pulled_embeddings(self, task: Task, features: FeatureFn) -> tuple[torch.Tensor, torch.Tensor]:
        """The authors' statistics pass: class by class, in class order, every forward pulls the running adapter
        toward the mean of the earlier tasks' adapters (see :class:`_PullSchedule`); the next task warm-starts from
        the adapter those pulls leave. Stored adapter ``t`` is the one before the pass."""
        labels = torch.as_tensor(dataset_targets(task.train))  # [N], no image decoded where the data stores labels
        vit = getattr(self.backbone, "model", self.backbone)
        self._pull = _PullSchedule(
            start=self.adapter.vector(),
            mean=self.adapter_bank[: task.index].mean(dim=0),
            block_of=self.adapter.block_of_values(),
            depth=len(vit_blocks(vit)),
            merge_momentum=self.merge_momentum,
        )
        try:
            parts = [features(Subset(task.train, torch.nonzero(labels == c).flatten().tolist())) for c in task.classes]
            final = self._pull.final()
        finally:
            self._pull = None
        self.adapter.lerp_(final, 1.0)
        return torch.cat([z for z, _ in parts]), torch.cat([y for _, y in parts])

    def _align_classifier(self) -> None:
        """Re-trains the head on features sampled from every seen class's Gaussian (no exemplars), on the trainer's
        device (Lightning moves the module back to the CPU after each fit / predict)."""
        home = self.head.weight.device
        self.head.to(self.compute_device(home))
        try:
            loss = align_classifier(
                self.head,
                self.gaussians,
                epochs=self.align_epochs,
                lr=self.align_lr,
                samples_per_class=self.align_samples_per_class,
                batch_size=self.align_samples_per_class,
                weight_decay=self.weight_decay,
            )
        finally:
            self.head.to(home)
        self.task_info["align_final_loss"] = round(loss, 4)

    def _prototype_vector(self) -> torch.Tensor:
        if self.prototype_adapter == "first":
            return self.adapter_bank[0]
        return torch.zeros_like(self.adapter_bank[0])  # up-projections of zero: the plain PTM

    # ---- inference -------------------------------------------------------------------------------------------
    def _embed_with(self, x: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
        """Features ``[B, D]`` with the flattened ``adapter`` ``[P]`` in place of the running one."""
        return self.adapter.run_with(adapter, x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self._pull is not None:
            return self._embed_with(x, self._pull.next_vector().to(x.device))
        if self._embed_adapter is None:
            return self.backbone(x)
        return self._embed_with(x, self._embed_adapter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._predict(x)[0]

    def _predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores [B, C_seen], retrieved task [B], first-guess task [B])``."""
        num_seen, newest = len(self.seen_classes), self.task_index
        prototype_logits = self.prototypes(self._embed_with(x, self._prototype_vector()))  # [B, C] cosine
        first_guess = self.class_task[prototype_logits.argmax(1)]  # [B]
        if not self.retrieval:
            retrieved = torch.full_like(first_guess, newest)
            logits = self.head(self._embed_with(x, self.adapter_bank[newest]))[:, :num_seen]
        else:
            logits, retrieved = self._self_refine(x, first_guess)
        scores = logits.float()
        if self.ensemble:  # log(softmax(head) + softmax((t + 1) * cosine)): the authors' sum, kept as logits
            scaled = prototype_logits.float() * (newest + 1)
            scores = torch.logaddexp(F.log_softmax(scores, dim=1), F.log_softmax(scaled, dim=1))
        return scores, retrieved, first_guess

    def _self_refine(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed with the predicted task's adapter, predict again, repeat while the task changes; returns the final
        logits ``[B, C_seen]`` and the task whose adapter produced them ``[B]`` (at the cap, the last one tried)."""
        num_seen = len(self.seen_classes)
        logits = x.new_zeros(len(x), num_seen, dtype=torch.float32)
        used = task.clone()
        todo = torch.ones_like(task, dtype=torch.bool)  # samples whose logits must be (re)computed
        for _ in range(self.max_refine):
            for t in task[todo].unique().tolist():
                rows = todo & (task == t)
                logits[rows] = self.head(self._embed_with(x[rows], self.adapter_bank[t]))[:, :num_seen].float()
                used[rows] = t
            proposed = self.class_task[logits.argmax(1)]
            todo = proposed != used
            if not todo.any():
                break
            task = torch.where(todo, proposed, used)
        return logits, used

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.predict_output != "logits":  # embeddings, or the retention probe's backbone features
            return super().predict_step(batch, batch_idx, dataloader_idx)
        x, y = batch
        scores, retrieved, first_guess = self._predict(x)
        true_task = self.class_task[y.to(self.class_task.device)]
        counts = torch.stack([(retrieved == true_task).sum(), (first_guess == true_task).sum()]).cpu()
        self._retrieval_counts += torch.cat([counts, torch.tensor([len(y)])])
        return scores, y

    def on_predict_epoch_start(self) -> None:
        self._counts_before = self._retrieval_counts.clone()

    def on_predict_epoch_end(self) -> None:
        """Retrieval accuracies so far, over every rank's shard of this prediction."""
        scored = sum_counts_over_ranks(self._retrieval_counts - self._counts_before, self.device)
        self._retrieval_counts.copy_(self._counts_before + scored)  # in place: this runs in inference mode
        right, first_right, total = self._retrieval_counts.tolist()
        if not total:
            return
        if self.retrieval:  # without retrieval every image uses the newest adapter: nothing was retrieved
            self.task_info["retrieval_acc"] = round(100.0 * right / total, 4)
        self.task_info["first_guess_task_acc"] = round(100.0 * first_right / total, 4)

    def load_cil_state(self, state: dict[str, Any], tasks: Sequence[Task]) -> None:
        """Also reads checkpoints written before the class Gaussians moved into :class:`cil.gaussians.ClassGaussians`
        (``class_means`` / ``class_covs`` then)."""
        renamed = {"class_means": "gaussians.means", "class_covs": "gaussians.covs"}
        weights = {renamed.get(k, k): v for k, v in state["weights"].items()}
        super().load_cil_state({**state, "weights": weights}, tasks)

    def distributed_blocker(self) -> str | None:
        if self.statistics_adapter == "pulled":
            return (
                "MOS with statistics_adapter: pulled replays the authors' in-place pulls forward by forward, which a "
                "pass sharded over processes cannot (--method.init_args.statistics_adapter task can)"
            )
        return None


class _PullSchedule:
    """Adapters of the authors' statistics pass. Their ViT pulls the running adapter ``A`` toward the mean ``M`` of
    the earlier tasks' adapters once per block in every forward, in place, and block ``l`` runs with the adapter as
    it is after the ``l + 1``-th pull of that forward; after ``n`` pulls ``A_n = M + k^n (A - M)``, where ``k`` is
    one pull's keep factor: ``(1 - merge_momentum) = k^(depth + 1)`` (a training step pulls ``depth + 1`` times)."""

    def __init__(
        self, start: torch.Tensor, mean: torch.Tensor, block_of: torch.Tensor, depth: int, merge_momentum: float
    ) -> None:
        self.start, self.mean, self.block_of, self.depth = start, mean, block_of, depth  # [P], [P], [P] long, int
        self.keep = (1.0 - merge_momentum) ** (1.0 / (depth + 1))
        self.forwards = 0

    def next_vector(self) -> torch.Tensor:
        """The flattened adapter of the next forward ``[P]``: block ``l``'s values after ``depth * j + l + 1``
        pulls in forward ``j``."""
        pulls = (self.depth * self.forwards + self.block_of + 1).to(self.start.dtype)
        self.forwards += 1
        return self.mean + (self.start - self.mean) * torch.pow(self.keep, pulls)

    def final(self) -> torch.Tensor:
        """The running adapter after the pass ``[P]``: every block pulled ``depth`` times per forward."""
        return self.mean + (self.start - self.mean) * self.keep ** (self.depth * self.forwards)
