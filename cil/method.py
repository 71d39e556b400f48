"""The method protocol: one ``LightningModule`` per continual-learning method, driven task by task by the engine.

Call order per task (see :class:`cil.engine.Engine`)::

    begin_task(task)          # grow(task) -> before_task(task)
    trainer.fit(...)          # only if needs_fit(task); data = train_dataset(task, seen_tasks)
    after_task(task, features)
    trainer.fit(...)          # only if consolidation_dataset(task, seen_tasks) is not None (FPF's buffer finetuning)
    evaluate every seen task  # logits over all seen classes

The embedding / classifier split (:meth:`embed`, :meth:`classify`) lets the engine cache embeddings while
:attr:`embedding_frozen` is true, so frozen-backbone methods embed each image once per run.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cil._registry import Registry
from cil.backbones import Backbone
from cil.task import Task

__all__ = ["PROTOCOLS", "CILMethod", "FeatureFn", "create_method", "list_methods", "register_method"]

PROTOCOLS = ("class_incremental", "task_incremental")
"""``class_incremental``: one label space over all seen tasks, no task identity at test time (PILOT's setting).
``task_incremental``: the task of every test image is known and it is classified among that task's classes only
(NEVIS's protocol); training losses likewise compare a sample's logits only within its own task."""

FeatureFn = Callable[[Dataset[Any]], tuple[torch.Tensor, torch.Tensor]]
"""``features(dataset) -> (embeddings [N, D], labels [N])``, computed under the evaluation transform."""

M = TypeVar("M", bound="type[CILMethod]")
_METHODS = Registry[type["CILMethod"]]("method", "methods")


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator that makes a method available by ``name`` (``create_method(name, ...)``)."""
    return _METHODS.register(name)  # type: ignore[return-value]


def list_methods() -> list[str]:
    return _METHODS.names()


def method_class(name: str) -> type[CILMethod]:
    """The class registered as ``name``, or the method class a class path names (``methods.Finetune``: what a run's
    ``config.yaml`` records for a method argument such as FPF's ``method``)."""
    if "." in name and name not in _METHODS.names():
        module, _, attribute = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attribute, None)
        except ImportError:
            found = None
        if isinstance(found, type) and issubclass(found, CILMethod):
            return found
    return _METHODS.get(name)


def method_registry_name(method: CILMethod) -> str | None:
    """The name ``method``'s class is registered under, if any (for a class built at run time, such as FPF
    combined with the method it wraps, the name of the registered class it stands for)."""
    return _METHODS.name_of(getattr(method, "registry_class", None) or method)


def create_method(name: str, backbone: Backbone, **kwargs: Any) -> CILMethod:
    return _METHODS.get(name)(backbone=backbone, **kwargs)


class CILMethod(L.LightningModule):
    """Base class of every method.

    Subclasses set ``self.head`` (any module mapping embeddings ``[B, D]`` to logits ``[B, C_seen]``) and override
    the hooks they need. Labels are global class ids, contiguous in order of appearance, so the logits of the
    seen classes are simply columns ``0..C_seen-1``.

    Args:
        backbone: The feature extractor; injected so that configs choose it independently of the method.
    """

    head: nn.Module
    supported_protocols: ClassVar[tuple[str, ...]] = PROTOCOLS
    """Protocols the method is defined for; the engine refuses the others with a message."""
    supports_multilabel: ClassVar[bool] = False
    """Whether the method can learn multi-label tasks (multi-hot targets, sigmoid outputs)."""
    supported_scenarios: ClassVar[tuple[str, ...]] = ("class_incremental",)
    """Stream scenarios (:data:`cil.stream.SCENARIOS`) the method is defined for. ``domain_incremental`` needs a
    method that learns classes it has seen before from new images (later domains bring no new class); the engine
    refuses the others with a message."""
    supports_distributed: ClassVar[bool] = False
    """Whether the method is shown (``tests/test_distributed.py``) to give the single-process answer under DDP, where
    the engine gathers predictions, broadcasts rank 0's state after every task and sums counts; the engine refuses
    several processes for the others."""

    def distributed_blocker(self) -> str | None:
        """Why this method, as configured, cannot run on several processes (None: it can). The default follows
        :attr:`supports_distributed`; a method overrides it to refuse one setting only."""
        if type(self).supports_distributed:
            return None
        return f"{type(self).__name__} is not yet shown to give the single-process answer on several processes"

    @property
    def scores_unseen(self) -> bool:
        """Whether the method can score classes it has not trained on, from their names alone (a CLIP class-name
        head): then :meth:`zero_shot_classifier` scores tasks before they are trained (:mod:`cil.transfer`)."""
        return False

    def zero_shot_prompts(self, tasks: Sequence[Task]) -> list[str]:
        """What tells each class of ``tasks`` apart to a method that scores classes by name (CLIP: its prompt), in
        global id order: two classes with the same prompt get the same score. Only for :attr:`scores_unseen`."""
        raise NotImplementedError(f"{type(self).__name__} cannot score classes by name")

    def zero_shot_classifier(self, tasks: Sequence[Task]) -> Callable[[torch.Tensor], torch.Tensor]:
        """A classifier over the classes of ``tasks``, trained on or not: embeddings ``[B, D]`` -> logits
        ``[B, C]`` (the tasks' classes in global id order), as the method would score them now. Only for
        :attr:`scores_unseen` methods."""
        raise NotImplementedError(f"{type(self).__name__} cannot score classes by name")

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.seen_classes: list[int] = []
        self.new_classes: list[int] = []
        self.task_index = -1
        self.predict_output = "logits"  # the engine switches this to "embedding" for feature extraction
        self.task_info: dict[str, float] = {}  # method-specific facts about the last task, saved in tasks.csv
        self.protocol = "class_incremental"  # set by the engine from the run's config, see set_protocol
        self.task_of_class: list[int] = []  # the task that introduced each seen class, indexed by global class id
        # Set by the engine before the stream starts:
        self.num_tasks = 0  # the stream's length (k-FPF spaces its k finetunings over the whole stream)
        self.train_transform: Callable[[Any], torch.Tensor] | None = None  # what replay applies to buffer images
        self.count_flops = False  # whether to add the FLOPs of work done outside the Trainer's batches (below)
        self.extra_train_flops = 0.0  # FLOPs of optimisation run inside hooks, which the engine's sampler cannot see
        self.phase = "task"  # "consolidation" during the fit on consolidation_dataset()
        self._compiled_embed: Callable[[torch.Tensor], torch.Tensor] | None = None  # see extraction_embed

    def set_protocol(self, protocol: str) -> None:
        """Chooses the evaluation / training protocol (one of :data:`PROTOCOLS`) before the stream starts."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if protocol not in self.supported_protocols:
            raise ValueError(
                f"{type(self).__name__} does not support the {protocol} protocol (it supports "
                f"{', '.join(self.supported_protocols)})"
            )
        self.protocol = protocol

    def stream_blocker(self, tasks: Sequence[Task]) -> str | None:
        """Why this method, as configured, cannot learn a stream of these ``tasks`` (None: it can); the engine refuses
        such a stream before it writes anything (a prompt pool with fewer prompts than the stream has tasks)."""
        return None

    # ---- structure -------------------------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        """Called by the engine at the start of every task."""
        self.grow(task)
        self.before_task(task)

    def grow(self, task: Task) -> None:
        """Records the task's new classes (those no earlier task had: all of them in a class-incremental stream,
        none after the first domain of a domain-incremental one) and expands the heads by them. Structural and
        deterministic given the RNG state: the engine replays it when restoring a checkpoint."""
        self.task_index = task.index
        self.new_classes = self.unseen_classes(task)
        self.seen_classes = self.seen_classes + self.new_classes
        self.task_of_class = self.task_of_class + [task.index] * len(self.new_classes)
        if self.new_classes:  # a later domain adds no output (and must not rebuild the heads' parameters)
            self.expand_heads(len(self.new_classes))

    def unseen_classes(self, task: Task) -> list[int]:
        """The classes of ``task`` the method has not learned yet (global ids follow first appearance, so these are
        the ids from ``len(seen_classes)`` on): all of a class-incremental task's before it is trained, none of a
        later domain's."""
        return [c for c in task.classes if c >= len(self.seen_classes)]

    def expand_heads(self, num_new: int) -> None:
        """Adds outputs for ``num_new`` classes to every growing head."""
        expand = getattr(self.head, "expand", None)
        if expand is not None:
            expand(num_new)

    # ---- hooks -----------------------------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        """Per-task set-up after the heads grew (freeze / unfreeze modules, reset state)."""

    def needs_fit(self, task: Task) -> bool:
        """Whether the engine runs the optimisation loop for ``task``; forward-only methods return False."""
        return True

    def trainer_overrides(self, task: Task) -> dict[str, Any]:
        """Trainer arguments for this task's fit that override the config's (APER adapts for 20 epochs in the
        first task only, for example)."""
        return {}

    def train_dataset(self, task: Task, seen_tasks: Sequence[Task]) -> Dataset[Any]:
        """The data ``fit`` trains on: the task's own by default; replay and joint training override this."""
        return task.train

    def after_task(self, task: Task, features: FeatureFn) -> None:
        """After training: compute prototypes, merge modules, record buffer logits."""

    def consolidation_dataset(self, task: Task, seen_tasks: Sequence[Task]) -> Dataset[Any] | None:
        """Data for a second fit after :meth:`after_task` (FPF finetunes on its replay buffer there), or None.

        During that fit :attr:`phase` is ``"consolidation"``; ``training_step``, ``configure_optimizers`` and
        :meth:`trainer_overrides` tell the phases apart by it. Its cost counts as training of the task."""
        return None

    def consolidation_batch_size(self) -> int | None:
        """The consolidation fit's batch size (None: the run's ``data.batch_size``)."""
        return None

    @property
    def embedding_frozen(self) -> bool:
        """True while :meth:`embed` cannot change any more during the run, so embeddings may be cached."""
        return False

    def embedding_module(self) -> nn.Module | None:
        """The module whose state alone makes :meth:`embed`'s output, which the persistent feature cache hashes
        into its key (:mod:`cil.feature_cache`); None where the method does not say, and nothing is cached on
        disk. By default the backbone, for methods whose :meth:`embed` is the backbone's forward."""
        return self.backbone if type(self).embed is CILMethod.embed else None

    # ---- forward ---------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> embeddings ``[B, D]``."""
        return self.backbone(x)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, D]`` -> logits over the seen classes ``[B, C_seen]``."""
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings, backbone features or logits, labels)``; the engine picks with ``predict_output``."""
        x, y = batch
        if self.predict_output == "backbone":  # the shared network's own features (the retention probe)
            return self.backbone(x), y
        if self.predict_output == "embedding":
            return self.extraction_embed()(x), y
        return self(x), y

    def extraction_embed(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`embed` as feature extraction runs it: compiled once (``torch.compile``) while the embedding is
        frozen and the backbone asks for it (``backbone.compile``), eager otherwise."""
        if not (self.embedding_frozen and getattr(self.backbone, "compile_extraction", False)):
            return self.embed
        if self._compiled_embed is None:
            self._compiled_embed = torch.compile(self.embed)
        return self._compiled_embed

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The sequential fine-tuning loss; methods override it.

        Multi-class batches: cross-entropy over all seen classes (``class_incremental``) or over each sample's own
        task (``task_incremental``). Multi-label batches (targets ``[B, C_task]``): binary cross-entropy on the
        current task's logits.
        """
        x, y = batch
        logits = self(x)  # [B, C_seen]
        if y.ndim == 2:
            loss = F.binary_cross_entropy_with_logits(logits[:, self.new_classes], y.to(logits.dtype))
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
            return loss
        logits = self.protocol_logits(logits, y)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train/acc", (logits.argmax(1) == y).float().mean() * 100, on_epoch=True, batch_size=len(y))
        return loss

    def protocol_logits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Under ``task_incremental``, masks the logits ``[B, C_seen]`` of classes outside each sample's task (its
        label ``y [B]`` tells the task), so that a loss competes only within the task; unchanged otherwise."""
        if self.protocol != "task_incremental":
            return logits
        owner = torch.as_tensor(self.task_of_class, device=logits.device)  # [C_seen]
        same_task = owner[None, :] == owner[y][:, None]  # [B, C_seen]
        return logits.masked_fill(~same_task, torch.finfo(logits.dtype).min)

    def compute_device(self, default: torch.device) -> torch.device:
        """Where work outside the Trainer's batches (classifier alignment, a ridge solve) should run: the trainer's
        device (Lightning moves the module back to the CPU after each fit / predict), or ``default`` outside one."""
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else default

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Evaluation mode for the block, then every submodule's own mode back: Lightning keeps modules' modes
        across fits, so a method that evaluated itself in a hook would otherwise train its next task in eval mode."""
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training

    # ---- bookkeeping -----------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def cil_state(self) -> dict[str, Any]:
        """Everything needed to continue the stream from here (weights, buffers, seen classes)."""
        return {"task_index": self.task_index, "seen_classes": list(self.seen_classes), "weights": self.state_dict()}

    def load_cil_state(self, state: dict[str, Any], tasks: Sequence[Task]) -> None:
        """Restores :meth:`cil_state` on a freshly built method, replaying :meth:`grow` over the finished tasks."""
        for task in tasks[: state["task_index"] + 1]:
            self.grow(task)
        if self.seen_classes != state["seen_classes"]:
            raise ValueError("the checkpoint's classes do not match this stream's; was it written by another run?")
        self.load_state_dict(state["weights"], strict=True)

    def optimizer_with_cosine(
        self,
        name: str,
        lr: float,
        momentum: float,
        weight_decay: float,
        min_lr: float = 0.0,
        head_lr: float | None = None,
        interval: str = "step",
    ) -> dict[str, Any]:
        """SGD (the papers' choice) or AdamW over the trainable parameters, with a cosine schedule spanning the whole
        fit, stepped after every batch (``interval="step"``) or, as most authors' code does
        (``CosineAnnealingLR(T_max=epochs)``), after every epoch (``"epoch"``). ``head_lr`` gives the head its own
        learning rate (a pre-trained ViT whose features share a large mean needs a far faster head than backbone to
        learn in a few steps)."""
        if interval not in ("step", "epoch"):
            raise ValueError(f"the cosine schedule steps per 'step' or per 'epoch', got {interval!r}")
        params: Any = self.trainable_parameters()
        if head_lr is not None:
            head = {id(p) for p in self.head.parameters()}
            params = [
                {"params": [p for p in params if id(p) not in head]},
                {"params": [p for p in params if id(p) in head], "lr": head_lr},
            ]
        optimizer: torch.optim.Optimizer
        if name == "sgd":
            optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        elif name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        else:
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
        if interval == "step":
            periods = int(self.trainer.estimated_stepping_batches)
        else:
            periods = int(self.trainer.max_epochs or 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, periods), eta_min=min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
