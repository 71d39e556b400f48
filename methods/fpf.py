"""FPF and k-FPF: forgetting-prioritized finetuning of a few modules on a small replay buffer.

Zhao, Zhou, Long, Jiang, Zhang. "Does Continual Learning Equally Forget All Parameters?" (ICML 2023;
arXiv:2304.04158). Forgetting concentrates in a few task-specific modules (for CNNs: BatchNorm, the first
convolution, the classifier; :mod:`cil.sensitivity` measures it). So:

* **FPF** (``fpf``): after any continual-learning method, finetune only those modules for a few iterations on a
  small reservoir buffer of past training images (cross-entropy over all seen classes).
* **k-FPF** (``kfpf``): no replay at all while training (plain SGD on each task's data, the whole network), and FPF
  triggered ``k`` times, evenly spaced over the whole stream's training steps regardless of task boundaries.
  ``variant="kd"`` (k-FPF-KD) adds to each FPF step a distillation term, the mean squared error between the
  current logits and the logits stored with each buffer image (Mammoth's DER loss); ``variant="sgd"`` is k-FPF-SGD.

The modules are chosen by name (groups ``norm``, ``first_conv``, ``head``, ``patch_embed``, patterns) or by the
sensitivity ranking of the run's own training dynamics (``top:N``, see :func:`cil.sensitivity.select_units`). The
default, ``norm + first_conv + head``, is the paper's CNN choice; on a ViT the same words select every LayerNorm,
the patch projection and the head.

Departures (the paper's own hyper-parameters are not restated here: set them in the config):
    * The buffer is offered every image of a task once, when the task begins, in a seeded random order
      (:func:`cil.buffer.fill_from_task`); Mammoth offers the images of every training step, once per epoch.
    * k-FPF-KD records an image's logits after the task that brought it ends (the model trained on it, the
      evaluation transform); DER records them while training, at insertion. Images of the current task carry no
      logits yet and get only the cross-entropy term.
    * The trigger points of k-FPF are spaced in units of tasks: trigger ``i`` fires once the stream is
      ``(i + 1) * T / k`` tasks in (``T`` tasks, each counted by its own steps), which is even spacing over the
      steps when tasks are equally long, as in the paper's benchmarks.
    * FPF after every task (``apply="every_task"``, default) fills every row of the accuracy matrix with "the method
      plus FPF, had the stream ended here", and then restores the finetuned modules before the next task, so the
      wrapped method continues exactly as without FPF; ``apply="last_task"`` is the paper's single FPF at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cil.backbones import Backbone
from cil.buffer import ReservoirBuffer, fill_from_task
from cil.flops import flop_counter
from cil.method import CILMethod, FeatureFn, method_class, register_method
from cil.sensitivity import TrainingDynamics, rank_modules, select_units, unit_tensors
from cil.task import Task
from methods.er import replay_batch
from methods.finetune import Finetune

PAPER_MODULES = ("norm", "first_conv", "head")


@dataclass
class FPFOptions:
    """How FPF finetunes (the arguments of :class:`FPF` and :class:`KFPF` of the same names)."""

    buffer_size: int | None = None  # None: 500, or the wrapped method's own buffer
    class_balanced: bool = False
    modules: Sequence[str] = PAPER_MODULES
    fpf_steps: int = 100
    fpf_lr: float = 0.01
    fpf_momentum: float = 0.9
    fpf_batch_size: int = 32
    kd_weight: float = 0.0


class ForgettingPrioritizedFinetuning(CILMethod):
    """The FPF machinery shared by :class:`FPF` and :class:`KFPF`: a buffer, the module choice, the FPF loss, and
    an FPF run inside a fit (k-FPF's triggers).

    Args:
        backbone: The feature extractor.
        options: Buffer, modules and optimisation of FPF. A wrapped method that has its own buffer (``er``) shares
            it.
        **method: Arguments of the class FPF is combined with.
    """

    supports_multilabel = False
    supported_scenarios: ClassVar[tuple[str, ...]] = (
        "class_incremental",
    )  # not the wrapped method's: FPF is not shown on domain streams
    supports_distributed = True  # FPF's own steps run alike on every rank, on the same buffer minibatches

    def __init__(self, backbone: Backbone, *, options: FPFOptions, **method: Any) -> None:
        super().__init__(backbone, **method)
        inherited = getattr(self, "buffer", None)
        if inherited is not None and options.buffer_size not in (None, inherited.capacity):
            raise ValueError(
                f"{type(self).__name__} shares the wrapped method's buffer ({inherited.capacity} images); set its size "
                "in method_args and leave buffer_size unset"
            )
        self._owns_buffer = inherited is None
        self.buffer: ReservoirBuffer = (
            inherited
            if inherited is not None  # not `or`: an empty buffer is falsy
            else ReservoirBuffer(options.buffer_size or 500, class_balanced=options.class_balanced)
        )
        if not options.modules:
            raise ValueError("modules must name at least one unit to finetune (e.g. ['norm', 'first_conv', 'head'])")
        self.fpf_modules = list(options.modules)
        self.fpf_steps, self.fpf_lr, self.fpf_momentum = options.fpf_steps, options.fpf_lr, options.fpf_momentum
        self.fpf_batch_size, self.kd_weight = options.fpf_batch_size, options.kd_weight
        self.task_buffer_slots: list[int] = []  # slots holding images of the current task
        ranked = any(choice.startswith("top:") for choice in self.fpf_modules)
        self.dynamics = TrainingDynamics(self) if ranked else None  # the run's own sensitivity, for top:N

    # ---- stream hooks ----------------------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        super().before_task(task)
        if self._owns_buffer:
            self.task_buffer_slots = fill_from_task(self.buffer, task)
        else:  # the wrapped replay method filled it
            self.task_buffer_slots = [s for s, t in enumerate(self.buffer.tasks) if t == task.index]

    def after_task(self, task: Task, features: FeatureFn) -> None:
        super().after_task(task, features)
        if self.kd_weight > 0 and self.task_buffer_slots:  # distillation targets: the model that learnt them
            embeddings, _ = features(self.buffer.dataset(self.task_buffer_slots))  # [N, D]
            with torch.no_grad(), self.evaluating():
                logits = self.classify(embeddings.to(self.device, cast(torch.dtype, self.dtype)))  # [N, C_seen]
            self.buffer.record_logits(self.task_buffer_slots, logits)

    def on_train_start(self) -> None:
        if self.phase == "task" and self.dynamics is not None:
            self.dynamics.start_task(self.task_index)
        super().on_train_start()

    def on_train_epoch_end(self) -> None:
        if self.phase == "task" and self.dynamics is not None:
            self.dynamics.end_epoch()
        super().on_train_epoch_end()

    # ---- FPF -------------------------------------------------------------------------------------------------
    def fpf_units(self) -> list[str]:
        ranking = rank_modules(self.dynamics.frame()) if self.dynamics is not None and self.dynamics.rows else None
        return select_units(self, self.fpf_modules, ranking)

    def focus_on(self, units: Sequence[str]) -> tuple[list[nn.Parameter], Callable[[], None]]:
        """Makes only ``units`` trainable and keeps the running statistics of the other BatchNorms fixed. Returns
        the units' parameters and a function that undoes it."""
        params, undo_grads = self.train_only(units)
        undo_norms = self.fix_other_norms(units)

        def undo() -> None:
            undo_grads()
            undo_norms()

        return params, undo

    def train_only(self, units: Sequence[str]) -> tuple[list[nn.Parameter], Callable[[], None]]:
        """``requires_grad`` on the parameters of ``units`` only; returns them and a function that undoes it."""
        selected = {key for unit in units for key, _ in unit_tensors(self, unit)}
        params = [p for name, p in self.named_parameters() if name in selected]
        flags = {name: p.requires_grad for name, p in self.named_parameters()}
        for name, p in self.named_parameters():
            p.requires_grad_(name in selected)

        def undo() -> None:
            for name, p in self.named_parameters():
                p.requires_grad_(flags[name])

        return params, undo

    def fix_other_norms(self, units: Sequence[str]) -> Callable[[], None]:
        """Evaluation mode for the BatchNorms in training mode outside ``units``; returns a function that undoes it."""
        frozen_norms = [
            m
            for name, m in self.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and name not in units
        ]
        for module in frozen_norms:
            module.eval()

        def undo() -> None:
            for module in frozen_norms:
                module.train()

        return undo

    def fpf_loss(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the seen classes (within each image's task under ``task_incremental``), plus the
        weighted MSE to the stored logits of the images that have them."""
        logits = self(x)  # [B, C_seen]
        loss = F.cross_entropy(self.protocol_logits(logits, y), y)
        if self.kd_weight > 0:
            targets, mask = self.buffer.stored_logits(slots, logits.shape[1])  # [B, C_seen] x 2
            targets, mask = targets.to(logits.device, logits.dtype), mask.to(logits.device)
            squared = (logits - targets).pow(2) * mask
            loss = loss + self.kd_weight * squared.sum() / mask.sum().clamp(min=1)
        return loss

    def run_fpf_inline(self) -> None:
        """One FPF run inside the current fit (the module is on the training device): ``fpf_steps`` SGD steps on
        buffer minibatches, at most the fit's own ``max_steps``. Its FLOPs go to :attr:`extra_train_flops` (the
        engine's sampler sees only the fit's own batches)."""
        units = self.fpf_units()
        params, undo = self.focus_on(units)
        cap = self.trainer.max_steps  # a fit capped at N steps (`max_steps_per_fit`) caps its FPF runs too
        steps = self.fpf_steps if cap is None or cap < 0 else min(self.fpf_steps, cap)
        optimizer = torch.optim.SGD(params, lr=self.fpf_lr, momentum=self.fpf_momentum)
        precision = self.trainer.precision_plugin
        # Lightning's `manual_backward` refuses automatic optimisation, and these steps run between the fit's own
        # steps with their own optimiser; under `16-mixed` the loss is scaled with the fit's GradScaler instead.
        scaler: torch.amp.GradScaler | None = getattr(precision, "scaler", None)
        flops_per_image, images = 0.0, 0
        try:
            with torch.enable_grad():
                for step in range(steps):
                    x, y, slots = replay_batch(self, self.buffer, self.fpf_batch_size)
                    counter = flop_counter() if self.count_flops and step == 0 else None
                    with counter or contextlib.nullcontext():
                        with precision.forward_context():
                            loss = self.fpf_loss(x, y, slots)
                        _backward_and_step(loss, optimizer, scaler)
                    optimizer.zero_grad(set_to_none=True)
                    if counter is not None:
                        flops_per_image = counter.get_total_flops() / len(y)
                    images += len(y)
        finally:
            undo()
        self.extra_train_flops += flops_per_image * images
        self.task_info["fpf_runs"] = self.task_info.get("fpf_runs", 0) + 1
        self.task_info["fpf_params"] = sum(p.numel() for p in params)

    # ---- checkpoint ------------------------------------------------------------------------------------------
    def get_extra_state(self) -> Any:
        state: dict[str, Any] = {"dynamics": None if self.dynamics is None else list(self.dynamics.rows)}
        state["buffer"] = self.buffer.state_dict() if self._owns_buffer else None
        if not self._owns_buffer:
            state["wrapped"] = super().get_extra_state()
        return state

    def set_extra_state(self, state: Any) -> None:
        if self.dynamics is not None:
            self.dynamics.rows = list(state["dynamics"] or [])
        if self._owns_buffer:
            self.buffer.load_state_dict(state["buffer"])
        else:
            super().set_extra_state(state["wrapped"])


@register_method("kfpf")
class KFPF(ForgettingPrioritizedFinetuning, Finetune):
    """k-FPF: sequential fine-tuning without replay, plus ``k`` FPF runs spread evenly over the stream.

    Args:
        backbone: Pre-trained feature extractor (trained by plain SGD between FPF runs).
        k: FPF runs over the whole stream.
        variant: ``"sgd"`` (k-FPF-SGD: cross-entropy on the buffer) or ``"kd"`` (k-FPF-KD: plus distillation to
            the stored logits).
        buffer_size: Images in the reservoir buffer.
        class_balanced: Class-balancing reservoir sampling.
        modules: Which units FPF finetunes.
        fpf_steps: SGD steps per FPF run.
        fpf_lr: FPF learning rate.
        fpf_momentum: FPF momentum.
        fpf_batch_size: Buffer images per FPF step.
        kd_weight: Weight of the distillation term for ``variant="kd"``.
        lr: Learning rate of the task training (cosine-annealed over each task's fit).
        momentum: SGD momentum of the task training.
        weight_decay: Weight decay of the task training.
        optimizer: ``"sgd"`` or ``"adamw"`` for the task training.
        head_lr: The head's own learning rate in the task training (None: ``lr``).
    """

    fired: torch.Tensor  # FPF runs so far (a registered buffer, so it is in the checkpoint)

    def __init__(
        self,
        backbone: Backbone,
        k: int = 10,
        variant: str = "sgd",
        buffer_size: int = 500,
        class_balanced: bool = False,
        modules: Sequence[str] = PAPER_MODULES,
        fpf_steps: int = 100,
        fpf_lr: float = 0.01,
        fpf_momentum: float = 0.9,
        fpf_batch_size: int = 32,
        kd_weight: float = 0.5,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
        head_lr: float | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if variant not in {"sgd", "kd"}:
            raise ValueError(f"variant must be 'sgd' (k-FPF-SGD) or 'kd' (k-FPF-KD), got {variant!r}")
        options = FPFOptions(
            buffer_size, class_balanced, modules, fpf_steps, fpf_lr, fpf_momentum, fpf_batch_size,
            kd_weight=kd_weight if variant == "kd" else 0.0,
        )  # fmt: skip
        super().__init__(
            backbone,
            options=options,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            optimizer=optimizer,
            head_lr=head_lr,
        )
        self.k, self.variant = k, variant
        self.register_buffer("fired", torch.tensor(0))

    def _fire_due(self, steps_done: int) -> None:
        """Runs every FPF whose trigger point the stream has reached: trigger ``i`` is due once
        ``task_index + steps_done / steps_of_task >= (i + 1) * num_tasks / k``."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        tasks = max(1, self.num_tasks)
        while int(self.fired) < self.k and (int(self.fired) + 1) * tasks * total <= self.k * (
            self.task_index * total + steps_done
        ):
            self.fired += 1
            self.run_fpf_inline()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._fire_due(self.trainer.global_step)

    def on_train_end(self) -> None:
        self._fire_due(max(1, int(self.trainer.estimated_stepping_batches)))  # triggers a short fit skipped
        super().on_train_end()


@register_method("fpf")
class FPF(ForgettingPrioritizedFinetuning):
    """FPF on top of another registered method (``method``), combined with it by inheritance: ``FPF(backbone,
    method="er")`` returns an instance of ``FPF[ER]``, a class deriving from both :class:`FPF` and
    :class:`methods.er.ER` (built once per wrapped class), so the wrapped method runs unchanged and FPF adds a
    consolidation fit on the buffer after each task (or only after the last).

    Args:
        backbone: The feature extractor.
        method: Registered name of the wrapped method.
        method_args: Its arguments.
        apply: ``"every_task"`` (FPF after every task, then restored: every row of the accuracy matrix is "method +
            FPF") or ``"last_task"`` (the paper's single FPF at the end of the stream).
        buffer_size: Images in the reservoir buffer (default 500). A wrapped method with a buffer of its own (``er``)
            shares it: set its size in ``method_args``.
        class_balanced: Class-balancing reservoir sampling.
        modules: Which units FPF finetunes.
        fpf_steps: SGD steps of each FPF.
        fpf_lr: FPF learning rate.
        fpf_momentum: FPF momentum.
        fpf_batch_size: Buffer images per FPF step.
        kd_weight: Weight of the distillation term (0: the paper's FPF, cross-entropy only).
    """

    def __init__(
        self,
        backbone: Backbone,
        method: str = "finetune",
        method_args: dict[str, Any] | None = None,
        apply: str = "every_task",
        buffer_size: int | None = None,
        class_balanced: bool = False,
        modules: Sequence[str] = PAPER_MODULES,
        fpf_steps: int = 100,
        fpf_lr: float = 0.01,
        fpf_momentum: float = 0.9,
        fpf_batch_size: int = 32,
        kd_weight: float = 0.0,
    ) -> None:
        if apply not in {"every_task", "last_task"}:
            raise ValueError(f"apply must be 'every_task' or 'last_task', got {apply!r}")
        # Become FPF[wrapped] before anything is built: the initialisers below (FPF's, then the wrapped method's) run
        # along that class's MRO, and every hook FPF overrides reaches the wrapped method through super().
        self.__class__ = _combined(method_class(method))
        options = FPFOptions(
            buffer_size, class_balanced, modules, fpf_steps, fpf_lr, fpf_momentum, fpf_batch_size, kd_weight
        )
        super().__init__(backbone, options=options, **(method_args or {}))
        self.wrapped, self.apply_after = method, apply  # not `self.apply`: that is nn.Module.apply
        self._unfocus: Callable[[], None] | None = None  # the consolidation fit's BatchNorm modes
        self._unfocus_grads: Callable[[], None] | None = None  # and its trainable parameters
        self._fpf_units: list[str] = []
        self._fpf_params: list[nn.Parameter] = []
        self.pre_fpf: dict[str, torch.Tensor] = {}  # the finetuned tensors as the wrapped method left them

    @property
    def embedding_frozen(self) -> bool:
        return False  # FPF changes the backbone's units after every task, whatever the wrapped method does

    # ---- the consolidation fit -------------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        with torch.no_grad():  # undo the last FPF: the wrapped method continues from its own weights
            state = dict(self.named_parameters()) | dict(self.named_buffers())
            for key, saved in self.pre_fpf.items():
                state[key].copy_(saved)
        self.pre_fpf = {}
        super().begin_task(task)

    def consolidation_dataset(self, task: Task, seen_tasks: Sequence[Task]) -> Dataset[Any] | None:
        if self.apply_after == "last_task" and task.index < self.num_tasks - 1:
            return None
        units = self.fpf_units()
        if self.apply_after == "every_task" and task.index < self.num_tasks - 1:
            self.pre_fpf = {key: t.detach().clone() for u in units for key, t in unit_tensors(self, u)}
        self._fpf_units = units
        selected = {key for unit in units for key, _ in unit_tensors(self, unit)}
        self._fpf_params = [p for name, p in self.named_parameters() if name in selected]
        self.task_info["fpf_params"] = sum(p.numel() for p in self._fpf_params)
        return self.buffer.dataset(with_slots=True)

    def consolidation_batch_size(self) -> int | None:
        return self.fpf_batch_size

    def trainer_overrides(self, task: Task) -> dict[str, Any]:
        if self.phase == "consolidation":
            return {"max_epochs": -1, "max_steps": self.fpf_steps}
        return super().trainer_overrides(task)

    def configure_optimizers(self) -> Any:
        if self.phase == "consolidation":
            return torch.optim.SGD(self._fpf_params, lr=self.fpf_lr, momentum=self.fpf_momentum)
        return super().configure_optimizers()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.phase != "consolidation":
            return super().training_step(batch, batch_idx)
        x, y, slots = batch
        loss = self.fpf_loss(x, y, slots.cpu())
        self.log("fpf/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    # The wrapped method's training hooks belong to its own fit, not to FPF's.
    def setup(self, stage: str) -> None:
        if self.phase == "consolidation" and stage == "fit":  # before DDP wraps the model: the set of trainable
            _, self._unfocus_grads = self.train_only(self._fpf_units)  # parameters must be fixed by then
        else:
            super().setup(stage)

    def on_train_start(self) -> None:
        if self.phase != "consolidation":
            super().on_train_start()
            return
        self._unfocus = self.fix_other_norms(self._fpf_units)  # after Lightning put every module in training mode

    def on_train_epoch_start(self) -> None:
        if self.phase != "consolidation":
            super().on_train_epoch_start()

    def on_train_epoch_end(self) -> None:
        if self.phase != "consolidation":
            super().on_train_epoch_end()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        if self.phase == "consolidation":
            CILMethod.optimizer_step(self, *args, **kwargs)
        else:
            super().optimizer_step(*args, **kwargs)

    def on_train_end(self) -> None:
        if self.phase != "consolidation":
            super().on_train_end()
            return
        assert self._unfocus is not None and self._unfocus_grads is not None
        self._unfocus()
        self._unfocus_grads()
        self._unfocus = self._unfocus_grads = None

    def get_extra_state(self) -> Any:
        return {**super().get_extra_state(), "pre_fpf": dict(self.pre_fpf)}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.pre_fpf = dict(state["pre_fpf"])


_COMBINED: dict[type[CILMethod], type[FPF]] = {}


def _combined(wrapped: type[CILMethod]) -> type[FPF]:
    """The class ``FPF[wrapped]`` (one per wrapped class, so that instances share a type)."""
    if issubclass(wrapped, ForgettingPrioritizedFinetuning):
        raise ValueError(f"FPF cannot wrap {wrapped.__name__}, which already finetunes on its buffer")
    if wrapped not in _COMBINED:
        _COMBINED[wrapped] = type(
            f"FPF[{wrapped.__name__}]", (FPF, wrapped), {"__module__": __name__, "registry_class": FPF}
        )  # reports as "fpf" whatever it wraps
    return _COMBINED[wrapped]


def _backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """One optimiser step; with a GradScaler (fp16 mixed precision) the loss is scaled, gradients are unscaled
    before the step, a step with infinite gradients is skipped and the scale adapts, as in Lightning's own steps."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
