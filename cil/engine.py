"""The engine: drives one method through a stream, task by task, and keeps the run directory up to date.

Per task: seed -> ``method.begin_task`` -> a fresh ``Trainer`` -> ``fit`` (if the method trains) ->
``method.after_task`` -> a consolidation fit (if the method asks for one: FPF) -> evaluate every seen task (and,
with ``evaluate_future``, the tasks not trained yet: :mod:`cil.transfer`) -> write results, summary and a
checkpoint atomically.
A run killed at any point resumes (``resume=True``) after its last finished task with identical results,
because every task starts from a seed derived from the run's seed and the task index, not from RNG history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics.functional.classification import multilabel_average_precision

from cil._distributed import GatherPredictions, broadcast_state, is_rank_zero, state_digest, sum_over_ranks
from cil._interrupt import Interrupted, signals_deferred
from cil._lock import exclusive_run_directory
from cil._malloc import tune_malloc
from cil._progress import Progress
from cil._unchanged_weights import UnchangedWeights
from cil.data import DataConfig, Transformed, build_transform, make_loader
from cil.feature_cache import FORMAT as FEATURE_CACHE_FORMAT
from cil.feature_cache import FeatureStore
from cil.flops import flop_counter
from cil.method import CILMethod, list_methods, method_class, method_registry_name
from cil.metrics import TaskAccuracy
from cil.results import (
    RESULT_COLUMNS,
    accuracy_matrix,
    atomic_torch_save,
    atomic_write_text,
    content_sha256,
    summarize,
)
from cil.retention import retention_accuracy
from cil.stream import Stream
from cil.task import Task, stored_targets
from cil.tracking import RunTracker
from cil.transfer import ZeroShotScorer, check_evaluation, needs_zero_shot

__all__ = ["MAX_SEED", "Engine", "TrainerFactory", "config_hash", "describe_stream", "make_trainer_factory"]

log = logging.getLogger(__name__)

TrainerFactory = Callable[[int, Sequence[Callback], dict[str, Any]], L.Trainer]
"""``factory(task_index, extra_callbacks, overrides) -> a fresh Trainer`` (one per task: a second ``fit`` on a used
Trainer does not train again). ``overrides`` are the method's per-task Trainer arguments (e.g. ``max_epochs``)."""

BEFORE_TRAINING = "(pre-trained)"
"""``train_task_name`` of the zero-shot baseline's rows in ``results.csv`` (``train_task`` -1)."""

MAX_SEED = 2**32 - 1
"""The largest seed ``lightning.seed_everything`` (numpy) accepts; task ``i`` of a run is seeded with ``seed + i``."""

# Config keys that steer or describe the run but cannot change its results; resuming may change them.
_RUN_CONTROL_KEYS = {
    *("out", "resume", "config", "keep_checkpoints", "logger", "reported", "count_flops", "feature_cache", "quiet")
}
_TRAINER_DISPLAY_KEYS = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps", "callbacks", "logger"}


# Config keys added after runs were written: hashed only when set to something else, so those runs still resume.
_LATER_KEY_DEFAULTS = {"evaluate_future": False, "label_space": "seen"}
_LATER_GROUP_KEY_DEFAULTS = {"backbone": {"channels_last": True, "compile": False}}


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of everything in ``config`` that can change a run's results."""
    relevant = {
        k: v for k, v in identity(config).items() if not (k in _LATER_KEY_DEFAULTS and v == _LATER_KEY_DEFAULTS[k])
    }
    for group, defaults in _LATER_GROUP_KEY_DEFAULTS.items():
        if isinstance(relevant.get(group), dict):
            relevant[group] = {k: v for k, v in relevant[group].items() if k not in defaults or v != defaults[k]}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without what does not change a run's numbers: the run-control keys (``out``, ``resume``, ...) and
    the trainer's display keys (progress bars, logging, trackers). What a tracker gets as hyper-parameters: the same
    for a run and its resumption."""
    kept = {k: v for k, v in config.items() if k not in _RUN_CONTROL_KEYS}
    if isinstance(kept.get("trainer"), dict):
        kept["trainer"] = {k: v for k, v in kept["trainer"].items() if k not in _TRAINER_DISPLAY_KEYS}
    return kept


def make_trainer_factory(
    out: Path, trainer_kwargs: dict[str, Any] | None = None, logger: str = "csv", max_steps_per_fit: int | None = None
) -> TrainerFactory:
    """A factory of fresh Trainers that log each task to ``out/logs/task_{i:03d}``.

    Args:
        out: Run directory.
        trainer_kwargs: ``lightning.Trainer`` arguments (accelerator, precision, max_epochs, ...).
        logger: ``"csv"`` (Lightning's CSVLogger), ``"tensorboard"`` or ``"none"``.
        max_steps_per_fit: Caps every fit at this many optimiser steps, whatever epochs or steps the method asks
            for (smoke tests and tiny runs: one override that bounds every method's training length).
    """
    if max_steps_per_fit is not None and max_steps_per_fit < 1:
        raise ValueError(f"max_steps_per_fit must be a positive number of steps, got {max_steps_per_fit}")
    kwargs = dict(trainer_kwargs or {})
    user_callbacks = list(kwargs.pop("callbacks", None) or [])
    for reserved in ("logger", "enable_checkpointing", "default_root_dir"):
        if reserved in kwargs and kwargs[reserved] not in (None, False):
            where = "trackers are Engine(trackers=[...]); " if reserved == "logger" else ""
            raise ValueError(f"trainer.{reserved} is managed by the engine ({where}per-task logs, atomic checkpoints)")
        kwargs.pop(reserved, None)
    if logger not in {"csv", "tensorboard", "none"}:
        raise ValueError(f"logger must be 'csv', 'tensorboard' or 'none', got {logger!r}")

    def factory(task_index: int, callbacks: Sequence[Callback], overrides: dict[str, Any]) -> L.Trainer:
        overrides = dict(overrides)
        version = overrides.pop("log_version", f"task_{task_index:03d}")
        task_logger: Logger | bool
        if overrides.pop("logger", True) is False:  # a trainer that only predicts (the retention probe)
            task_logger = False
        elif logger == "csv":
            task_logger = CSVLogger(out / "logs", name="", version=version)
        elif logger == "tensorboard":
            task_logger = TensorBoardLogger(out / "logs", name="", version=version)
        else:
            task_logger = False
        arguments = {**kwargs, **overrides}
        if max_steps_per_fit is not None:
            asked = arguments.get("max_steps")
            if asked is None or asked < 0 or asked > max_steps_per_fit:
                arguments["max_steps"] = max_steps_per_fit
        if arguments.get("max_epochs") == -1 and arguments.get("max_steps", -1) in (None, -1):
            raise ValueError(
                "trainer.max_epochs -1 trains until trainer.max_steps, which is not set, so every fit would run "
                "forever; give a number of epochs (--trainer.max_epochs 1) or a step limit (--trainer.max_steps N)"
            )
        try:
            return L.Trainer(
                **arguments,
                logger=task_logger,
                callbacks=[*user_callbacks, *callbacks],
                enable_checkpointing=False,
                default_root_dir=out,
            )
        except (MisconfigurationException, ImportError, ValueError, TypeError, RuntimeError) as error:
            raise ValueError(_trainer_error(arguments, error)) from error

    return factory


_TRAINER_FIXES = {
    "accelerator": "use --trainer.accelerator auto (the best device this machine has) or cpu",
    "devices": "use --trainer.devices auto, 1, or a list of device ids this machine has",
    "precision": "use --trainer.precision 32-true, or bf16-mixed / 16-mixed where the device supports them",
    "strategy": "use --trainer.strategy auto, or ddp for several processes",
    "max_epochs": "use a number of epochs >= 0, or -1 together with --trainer.max_steps",
    "max_steps": "use a number of steps >= 0, or -1 for no step limit",
}


def _trainer_error(arguments: dict[str, Any], error: BaseException) -> str:
    """A one-line account of why ``lightning.Trainer(**arguments)`` failed that names the trainer key to fix: the
    first key that fails on its own, or every given key when only their combination fails."""
    reason = next((line.strip(" .") for line in str(error).splitlines() if line.strip(" .")), type(error).__name__)
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    for key, value in arguments.items():
        try:
            L.Trainer(**{**quiet, "enable_model_summary": False, key: value})
        except Exception:
            fix = _TRAINER_FIXES.get(key, f"fix or remove trainer.{key}")
            return f"trainer.{key}={value!r} cannot make a Lightning Trainer on this machine: {reason}; {fix}"
    given = ", ".join(f"trainer.{key}={value!r}" for key, value in arguments.items())
    return f"these trainer options cannot make a Lightning Trainer together ({given}): {reason}"


class _ImageCounter(Callback):
    """Counts training images so that throughput is exact whatever the epoch / step limits, and optimiser steps
    (every fit of the task)."""

    def __init__(self) -> None:
        self.images = 0
        self.steps = 0

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.steps += trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.images += len(batch[1])


class _FlopSampler(Callback):
    """Training FLOPs: counted exactly (:func:`cil.flops.flop_counter`: matrix multiplications, convolutions and
    attention, forward and backward) on the first ``sample`` batches of every training epoch and of every feature
    extraction while ``count_predictions`` is on, then scaled by the images of that epoch / extraction. Counting
    every batch would cost a Python dispatch per operator (4x the run time of MOS on the tiny test ViT); sampling
    keeps the count exact for any model whose cost per image is constant within an epoch."""

    def __init__(self, sample: int = 1) -> None:
        self.sample = sample
        self.total = 0.0
        self.count_predictions = False
        self._mode: FlopCounterMode | None = None
        self._reset()

    def _reset(self) -> None:
        self._sampled_batches = 0
        self._sampled_flops = 0
        self._sampled_images = 0
        self._images = 0

    def _start_batch(self) -> None:
        if self._sampled_batches < self.sample:
            self._mode = flop_counter()
            self._mode.__enter__()

    def _end_batch(self, batch: Any) -> None:
        images = len(batch[1])
        self._images += images
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._sampled_flops += self._mode.get_total_flops()
            self._sampled_images += images
            self._sampled_batches += 1
            self._mode = None

    def _end_phase(self) -> None:
        if self._sampled_images:
            self.total += self._sampled_flops / self._sampled_images * self._images
        self._reset()

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, i: int) -> None:
        self._start_batch()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self._end_batch(batch)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._end_phase()

    def on_predict_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._reset()

    def on_predict_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, i: int, dataloader_idx: int = 0
    ) -> None:
        if self.count_predictions:
            self._start_batch()

    def on_predict_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, i: int, dataloader_idx: int = 0
    ) -> None:
        if self.count_predictions:
            self._end_batch(batch)

    def on_predict_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.count_predictions:
            self._end_phase()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None


class _FeatureCache:
    """Embeddings of datasets under the evaluation transform, reused while the method's embedding is frozen: in
    memory for the run, and on disk across runs with a :class:`~cil.feature_cache.FeatureStore`."""

    def __init__(self, engine: Engine, store: FeatureStore | None = None) -> None:
        self.engine = engine
        self.store = store
        self.trainer: L.Trainer | None = None
        self._cache: dict[int, tuple[Dataset[Any], torch.Tensor, torch.Tensor]] = {}
        self._description: dict[str, Any] | None = None  # of the frozen embedding, for the store
        self.images = 0  # images that went through the backbone

    def __call__(self, dataset: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        method = self.engine.method
        if not method.embedding_frozen:
            self._cache.clear()
            self._description = None
        hit = self._cache.get(id(dataset))
        if hit is not None:
            return hit[1], hit[2]
        found = None
        if self.store is not None and method.embedding_frozen and (description := self.description()) is not None:
            found = self.store.embed(description, dataset, self._compute)
        embeddings, labels = found if found is not None else self._compute(dataset)
        if method.embedding_frozen:
            self._cache[id(dataset)] = (dataset, embeddings, labels)  # keeps `dataset` alive so its id stays unique
        return embeddings, labels

    def _compute(self, dataset: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings, labels = self.engine._predict(self.trainer, dataset, "embedding")
        self.images += len(labels)
        return embeddings, labels

    def description(self) -> dict[str, Any] | None:
        """What makes the frozen embedding (the store's key), or None where the method does not name the module
        its embedding depends on. The weights are hashed once while the embedding stays frozen."""
        if self._description is None:
            method, trainer = self.engine.method, self.trainer
            module = method.embedding_module()
            if module is None or trainer is None:
                return None
            backbone = method.backbone
            self._description = {
                "format": FEATURE_CACHE_FORMAT,
                "embed": f"{type(method).embed.__module__}.{type(method).embed.__qualname__}",
                "weights": state_digest(module),
                "transform": repr(self.engine.eval_transform),
                "input_size": backbone.input_size,
                "mean": list(backbone.mean),
                "std": list(backbone.std),
                "precision": str(trainer.precision),
                "device": trainer.strategy.root_device.type,
                "channels_last": bool(getattr(backbone, "channels_last", False)),
                "compile": bool(getattr(backbone, "compile_extraction", False)),
                "torch": torch.__version__,
            }
        return self._description


class Engine:
    """Runs ``method`` over ``stream`` and writes the run directory ``out``.

    Args:
        method: The continual learner.
        stream: The tasks, in order.
        out: Run directory (see :mod:`cil.results`).
        trainer_factory: Builds a fresh Trainer per task; default: CPU/GPU auto, 1 epoch, CSV logs.
        data: Batch sizes and workers.
        seed: Run seed; task ``i`` starts from ``seed + i``.
        config: The resolved config, saved as ``config.yaml`` and hashed into every checkpoint.
        resume: Continue after the last checkpoint in ``out`` instead of refusing a non-empty ``out``.
        keep_checkpoints: Keep only the newest N task checkpoints (0: keep all).
        protocol: ``"class_incremental"`` or ``"task_incremental"`` (see :data:`cil.method.PROTOCOLS`).
        evaluate_future: Also score every task not trained yet, after every step, and (for methods that score
            classes by name) every task before the first: R's upper triangle and the zero-shot baseline, which FWT
            and MTIL's Transfer need (:mod:`cil.transfer`).
        label_space: ``"seen"`` or ``"stream"``: the classes a test image is scored among (:mod:`cil.transfer`).
        retention: Held-out tasks that are never trained: the nearest-prototype accuracy of the backbone's features
            on them is measured before the first task and after every task (:mod:`cil.retention`).
        count_flops: Count the training FLOPs of every task (see :class:`_FlopSampler`): the fit and the feature
            extractions of ``after_task``; a method's own arithmetic on cached features (MOS's classifier alignment)
            is not counted.
        verbose: Let Lightning print its per-Trainer banners and tips (hardware, logging); by default a run shows
            only progress and warnings.
        feature_cache: A folder of frozen embeddings shared by runs (:mod:`cil.feature_cache`): images another run,
            seed or method already embedded with the same weights, transform and precision are read, not embedded
            again. One process only.
        trackers: Lightning loggers (``WandbLogger``, ``MLFlowLogger``, ...) that follow the whole run as one tracker
            run: the config, every fit's training metrics, each task's accuracies, the summary and the accuracy
            matrix (:mod:`cil.tracking`). The Trainers' own per-task logs are the ``trainer_factory``'s.

    A run applies :func:`cil._malloc.tune_malloc` (glibc allocator settings, 2-3x faster CPU training) unless
    ``CIL_NO_MALLOC_TUNING=1``. Without a ``config`` (Python API), ``config.yaml`` records the method's class and
    arguments, the backbone, the stream, the data settings, the seed, the protocol, ``evaluate_future`` and
    ``label_space``.
    """

    def __init__(
        self,
        method: CILMethod,
        stream: Stream,
        out: str | Path,
        *,
        trainer_factory: TrainerFactory | None = None,
        data: DataConfig | None = None,
        seed: int = 0,
        config: dict[str, Any] | None = None,
        resume: bool = False,
        keep_checkpoints: int = 0,
        protocol: str = "class_incremental",
        count_flops: bool = True,
        retention: Stream | None = None,
        evaluate_future: bool = False,
        label_space: str = "seen",
        verbose: bool = False,
        feature_cache: str | Path | None = None,
        trackers: Sequence[Logger] = (),
    ) -> None:
        method.set_protocol(protocol)  # validates the name and the method's support
        _check_task_kinds(method, stream, protocol)
        _check_scenario(method, stream, protocol)
        blocker = method.stream_blocker(stream.tasks)
        if blocker is not None:
            raise ValueError(blocker)
        check_evaluation(method, stream, protocol, label_space, evaluate_future)
        self.protocol = protocol
        self.evaluate_future, self.label_space = evaluate_future, label_space
        self.zero_shot = ZeroShotScorer(method, stream) if method.scores_unseen else None
        self.count_flops = count_flops
        self.retention = retention
        self.method = method
        self.stream = stream
        self.out = Path(out)
        self.trainer_factory = trainer_factory or make_trainer_factory(self.out, {"max_epochs": 1})
        self.data = data or DataConfig()
        self.seed = seed
        self.verbose = verbose
        self.config = config or api_config(method, stream, self.data, seed, protocol, evaluate_future, label_space)
        self.resume = resume
        self.keep_checkpoints = keep_checkpoints
        self.config_hash = config_hash(self.config)
        self.stream_fingerprint = stream_fingerprint(stream)
        registered = method_registry_name(method)
        self.method_name = str(self.config.get("method_name") or registered or type(method).__name__.lower())
        self.results: list[dict[str, Any]] = []
        self.task_costs: list[dict[str, Any]] = []
        self.unchanged = UnchangedWeights(method)  # the weights as built, before any restore
        self.features = _FeatureCache(self, FeatureStore(feature_cache) if feature_cache is not None else None)
        self.tracker = RunTracker(trackers) if trackers else None
        self.train_transform = build_transform(
            method.backbone.input_size, method.backbone.mean, method.backbone.std, train=self.data.augment
        )
        self.eval_transform = build_transform(
            method.backbone.input_size, method.backbone.mean, method.backbone.std, train=False
        )
        method.num_tasks = len(stream)
        method.train_transform = self.train_transform
        method.count_flops = count_flops

    # ---- public ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Runs (or continues) the stream; returns the summary."""
        tune_malloc()
        with contextlib.ExitStack() as quiet:
            if not self.verbose:
                quiet.enter_context(_quiet_lightning())
            if not is_rank_zero():  # several processes: rank 0 reports progress
                level = log.level
                log.setLevel(logging.WARNING)
                quiet.callback(log.setLevel, level)
            return self._run()

    def _run(self) -> dict[str, Any]:
        self._check_seed()
        self._check_out_is_writable()
        self._refuse_unsupported_distributed()  # builds task 0's Trainer: bad trainer options stop the run here
        with contextlib.ExitStack() as writing:
            if is_rank_zero():
                writing.enter_context(self._tracked())  # trackers start before anything is written
                writing.enter_context(exclusive_run_directory(self.out))  # the one writer; a second one is refused
            return self._run_stream()

    def _run_stream(self) -> dict[str, Any]:
        start = self._restore() if self.resume else self._check_fresh_out()
        self.progress = Progress(self.stream.tasks, start)
        if self.tracker is not None and is_rank_zero():
            self.tracker.replay(self.results, self.task_costs, len(self.stream), self.label_space, self.evaluate_future)
        if start == 0 and is_rank_zero():
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))
            atomic_write_text(self.out / "stream.json", json.dumps(describe_stream(self.stream), indent=2, default=str))
        for task in self.stream.tasks[start:]:
            try:
                self._run_task(task)
            except (Interrupted, SIGTERMException) as error:  # SIGTERMException: Lightning's, if nobody else handles it
                raise self._interrupted(task, error) from None
        if start == len(self.stream) > 0 and is_rank_zero():  # a finished run resumed: restore what was lost since
            rebuilt = self._write_results(only_changed=True)
            if rebuilt:
                log.info(
                    "%s: every task is finished; rebuilt %s from the last checkpoint", self.out, ", ".join(rebuilt)
                )
        return self.summary()

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        """The trackers follow the run (:mod:`cil.tracking`): its config before anything is written (a tracker that
        cannot start stops the run there), the summary and the accuracy matrix at the end, also when the run stops
        early. A run resumed after its last task makes no tracker run: it trains and logs nothing."""
        finished = self.resume and self._checkpoint_path(len(self.stream) - 1).is_file()
        if self.tracker is None or finished:
            yield
            return
        if not self.resume:
            self._check_fresh_out()  # a forgotten --resume is refused before it makes a tracker run
        self.tracker.start(identity(self.config), self.config_hash)
        status = "failed"
        try:
            yield
            status = "success"
        finally:
            self.tracker.finish(self.summary() if self.task_costs else None, self.out, status)

    def summary(self) -> dict[str, Any]:
        results, costs = pd.DataFrame(self.results), pd.DataFrame(self.task_costs)
        return summarize(results, costs, len(self.stream), self.label_space, self.evaluate_future)

    def accuracy_matrix(self) -> np.ndarray:
        return accuracy_matrix(pd.DataFrame(self.results, columns=RESULT_COLUMNS), len(self.stream))

    # ---- one task --------------------------------------------------------------------------------------------
    def _run_task(self, task: Task) -> None:
        method = self.method
        seen_tasks = self.stream.tasks[: task.index + 1]
        retention_before = None
        if self.retention is not None and task.index == 0:  # the pre-trained model, before anything changes it
            retention_before = self._retention(self.trainer_factory(task.index, [], {"logger": False}))
        baseline, future_s = self._baseline() if task.index == 0 else ([], 0.0)
        L.seed_everything(self.seed + task.index, workers=True, verbose=False)  # after the probes: same RNG either way
        started = time.perf_counter()
        method.extra_train_flops = 0.0
        method.begin_task(task)
        log.info(
            "task %d/%d %s: %d classes, %d new",
            *(task.index + 1, len(self.stream), task.name, task.num_classes, len(method.new_classes)),
        )
        fits = method.needs_fit(task)
        trainable = method.num_trainable_parameters() if fits else 0  # before after_task may freeze it
        counter = _ImageCounter()
        flops = _FlopSampler() if self.count_flops else None
        callbacks: list[Callback] = [counter] if flops is None else [counter, flops]
        trainer = self.trainer_factory(task.index, callbacks, method.trainer_overrides(task))
        if self.tracker is not None:
            self.tracker.attach(trainer)
        self.features.trainer = trainer
        self.features.images = 0
        if fits:
            train_data = Transformed(method.train_dataset(task, seen_tasks), self.train_transform)
            loader = make_loader(
                train_data, self.data.batch_size, True, self.data.num_workers, pin_memory=_on_gpu(trainer)
            )
            trainer.fit(method, train_dataloaders=loader)
        if flops is not None:
            flops.count_predictions = True  # feature extraction for prototypes etc. is part of training
        method.after_task(task, self.features)
        if flops is not None:
            flops.count_predictions = False
        consolidation = method.consolidation_dataset(task, seen_tasks)
        if consolidation is not None:
            self._consolidate(method, task, consolidation, callbacks)
        state_digest = broadcast_state(method)  # several processes: rank 0's state on every rank, checked
        fit_s = time.perf_counter() - started
        device = trainer.strategy.root_device
        train_images = int(sum_over_ranks(counter.images, device)) + self.features.images  # features: gathered

        if flops is not None:
            flops.total = sum_over_ranks(flops.total, device)
        train_flops = round(flops.total + method.extra_train_flops) if flops is not None else None
        earlier_flops = _cumulative_flops(self.task_costs)
        cumulative_flops = None if train_flops is None or earlier_flops is None else earlier_flops + train_flops
        started_eval = time.perf_counter()
        if self.zero_shot is not None:
            self.zero_shot.reset()  # the method changed in this task: its classifier is rebuilt once, on first use
        rows = self._evaluate(trainer, task.index, seen_tasks, cumulative_flops)
        retention = self._retention(trainer) if self.retention is not None else None
        eval_s = time.perf_counter() - started_eval
        future = self.stream.tasks[task.index + 1 :] if self.evaluate_future else ()
        if future:  # tasks not trained yet: R's upper triangle
            started_future = time.perf_counter()
            rows += self._evaluate(trainer, task.index, future, cumulative_flops)
            future_s += time.perf_counter() - started_future
        self.results.extend({**row, "retention_acc": retention_before} for row in baseline)  # the pre-trained model
        self.results.extend({**row, "retention_acc": retention} for row in rows)
        self.task_costs.append(
            {
                "task": task.index,
                "task_name": task.name,
                "n_new_classes": len(method.new_classes),
                "n_train": len(task.train),  # type: ignore[arg-type]
                "fit_s": round(fit_s, 3),
                "eval_s": round(eval_s, 3),
                "wall_s": round(fit_s + eval_s, 3),  # the run's cost: scoring the future is extra, below
                **({"future_eval_s": round(future_s, 3)} if self.evaluate_future else {}),
                "train_images": train_images,
                "train_steps": counter.steps,
                "eval_images": sum(len(t.test) for t in seen_tasks),  # type: ignore[arg-type, misc]
                "trainable_params": trainable,
                "train_flops": train_flops,
                **({} if retention is None else {"retention_acc": retention}),
                **({} if retention_before is None else {"retention_before": retention_before}),
                "total_params": sum(p.numel() for p in method.parameters()),
                **({} if state_digest is None else {"state_digest": state_digest}),
                **method.task_info,
            }
        )
        method.task_info = {}
        if is_rank_zero():
            with signals_deferred():  # a signal here waits until the task is fully recorded
                self._write(task)
            if self.tracker is not None:
                self.tracker.task_done(self.summary(), self.task_costs[-1])
        log.info("%s", self.progress.line(task, self.task_costs[-1], rows))

    def _consolidate(self, method: CILMethod, task: Task, data: Dataset[Any], callbacks: list[Callback]) -> None:
        """The method's second fit of the task, on its own data, with a fresh Trainer and its own log folder."""
        method.phase = "consolidation"
        try:
            overrides = {**method.trainer_overrides(task), "log_version": f"task_{task.index:03d}_consolidation"}
            trainer = self.trainer_factory(task.index, callbacks, overrides)
            if self.tracker is not None:
                self.tracker.attach(trainer)
            batch_size = method.consolidation_batch_size() or self.data.batch_size
            loader = make_loader(
                Transformed(data, self.train_transform), batch_size, True, self.data.num_workers, _on_gpu(trainer)
            )
            trainer.fit(method, train_dataloaders=loader)
        finally:
            method.phase = "task"

    def _baseline(self) -> tuple[list[dict[str, Any]], float]:
        """Every task scored by the pre-trained model before the first task, zero-shot (FWT's baseline), and the
        seconds it took; nothing unless ``evaluate_future`` is on and the method scores classes by name."""
        if not self.evaluate_future or self.zero_shot is None:
            return [], 0.0
        started = time.perf_counter()
        probe = self.trainer_factory(0, [], {"logger": False})
        self.features.trainer = probe
        self.zero_shot.reset()
        return self._evaluate(probe, -1, self.stream.tasks), time.perf_counter() - started

    def _retention(self, trainer: L.Trainer) -> float:
        assert self.retention is not None
        return retention_accuracy(self.retention, lambda data: self._predict(trainer, data, "backbone"))["mean"]

    def _predict(
        self, trainer: L.Trainer | None, dataset: Dataset[Any], output: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings or logits of ``dataset`` under the evaluation transform, using the trainer's device and
        precision. Returns ``(outputs [N, D or C], labels [N])`` on the CPU."""
        if trainer is None:
            raise RuntimeError("features are only available inside a task")
        loader = make_loader(
            Transformed(dataset, self.eval_transform),
            self.data.eval_batch_size,
            False,
            self.data.num_workers,
            pin_memory=_on_gpu(trainer),
        )
        self.method.predict_output = output
        gather = GatherPredictions() if trainer.world_size > 1 else None  # every rank predicts a shard
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        if gather is not None:
            callbacks.append(gather)
        try:
            batches = trainer.predict(self.method, dataloaders=loader, return_predictions=True)
        finally:
            self.method.predict_output = "logits"
            if gather is not None:
                callbacks.remove(gather)
        if gather is not None:
            assert gather.outputs is not None and gather.labels is not None
            return gather.outputs, gather.labels
        assert batches is not None  # return_predictions=True
        outputs = torch.cat([b[0].float().cpu() for b in batches])
        labels = torch.cat([torch.as_tensor(b[1]).cpu() for b in batches])
        return outputs, labels

    @torch.no_grad()
    def _evaluate(
        self, trainer: L.Trainer, step: int, tasks: Sequence[Task], cumulative_flops: int | None = None
    ) -> list[dict[str, Any]]:
        """One row of results per task of ``tasks``, scored after ``step`` (-1: before the first task)."""
        method = self.method
        metric = TaskAccuracy(num_tasks=len(self.stream))
        average_precision: dict[int, float] = {}
        for scored in tasks:
            logits, labels = self._logits(trainer, scored)  # [N, C_seen] or [N, C_stream], [N]
            own = logits[:, scored.classes[0] : scored.classes[-1] + 1]  # [N, C_task]
            if scored.kind == "multilabel":  # mean average precision over the task's labels, as NEVIS scores them
                shown = labels.sum(dim=0) > 0  # AP is undefined for labels no test image has (sklearn skips them)
                score = (
                    multilabel_average_precision(
                        own[:, shown], labels[:, shown].int(), num_labels=int(shown.sum()), average="macro"
                    )
                    if shown.any()
                    else torch.tensor(float("nan"))
                )
                average_precision[scored.index] = 100.0 * float(score)
                continue
            if self.protocol == "task_incremental":  # the task is known: choose among its own classes only
                predictions = own.argmax(dim=1) + scored.classes[0]
            else:
                predictions = logits.argmax(dim=1)
            metric.update(predictions, labels, torch.full_like(labels, scored.index))
        correct, total = metric.correct.tolist(), metric.total.tolist()
        accuracy = metric.accuracy().tolist()
        rows = []
        for scored in tasks:
            multilabel = scored.index in average_precision
            rows.append(
                {
                    "method": self.method_name,
                    "stream": self.stream.name,
                    "seed": self.seed,
                    "protocol": self.protocol,
                    "train_task": step,
                    "eval_task": scored.index,
                    "train_task_name": self.stream.tasks[step].name if step >= 0 else BEFORE_TRAINING,
                    "eval_task_name": scored.name,
                    "n_seen_classes": len(method.seen_classes),
                    "metric": "map" if multilabel else "top1",
                    "accuracy": round(average_precision[scored.index] if multilabel else accuracy[scored.index], 6),
                    "n_correct": None if multilabel else correct[scored.index],
                    "n_test": len(scored.test) if multilabel else total[scored.index],  # type: ignore[arg-type]
                    "cum_train_flops": cumulative_flops,
                }
            )
        return rows

    def _logits(self, trainer: L.Trainer, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of ``task``'s test images over the label space, with global class ids as columns, and labels:
        from the method's head (``[N, C_seen]``) or, where it has no outputs for the task's classes or the label
        space is the whole stream, from its zero-shot classifier (``[N, C_stream]``, :mod:`cil.transfer`)."""
        method = self.method
        if self.zero_shot is not None and needs_zero_shot(task, method, self.label_space):
            embeddings, labels = self.features(task.test)
            return self.zero_shot(embeddings), labels
        if method.embedding_frozen:
            embeddings, labels = self.features(task.test)
            with method.evaluating():
                logits = torch.cat(
                    [method.classify(chunk.to(method.device)).float().cpu() for chunk in embeddings.split(4096)]
                )
        else:
            logits, labels = self._predict(trainer, task.test, "logits")
        if logits.shape[1] != len(method.seen_classes):
            raise ValueError(
                f"{type(method).__name__} returned {logits.shape[1]} logits; expected one per seen class "
                f"({len(method.seen_classes)})"
            )
        return logits, labels

    # ---- run directory ---------------------------------------------------------------------------------------
    def _write(self, task: Task) -> None:
        """Results first, checkpoint last: the checkpoint marks the task as finished."""
        self._write_results()
        self._write_checkpoint(task)

    def _write_results(self, only_changed: bool = False) -> list[str]:
        """``results.csv``, ``tasks.csv``, ``accuracy_matrix.csv`` and ``summary.json``, from the results held;
        returns the names written. ``only_changed``: files that already hold exactly that text are left untouched
        (a finished run resumed keeps its files, and their times, unless one was deleted or damaged)."""
        matrix = pd.DataFrame(
            self.accuracy_matrix(),
            index=pd.Index([t.name for t in self.stream], name="after_task"),
            columns=[t.name for t in self.stream],
        )
        texts = {
            "results.csv": pd.DataFrame(self.results, columns=RESULT_COLUMNS).to_csv(index=False),
            "tasks.csv": pd.DataFrame(self.task_costs).to_csv(index=False),
            "accuracy_matrix.csv": matrix.to_csv(float_format="%.4f"),
            "summary.json": json.dumps(self.summary(), indent=2),
        }
        written = []
        for name, text in texts.items():
            path = self.out / name
            if only_changed and path.is_file() and path.read_bytes() == text.encode():
                continue
            atomic_write_text(path, text)
            written.append(name)
        return written

    def _write_checkpoint(self, task: Task) -> None:
        """The state after ``task``, with the SHA-256 of its content (see :func:`cil.results.content_sha256`); large
        weights that still hold their starting values are stored by digest (:mod:`cil._unchanged_weights`)."""
        method = self.method.cil_state()
        method["weights"], unchanged = self.unchanged.strip(method["weights"])
        state: dict[str, Any] = {
            "config_hash": self.config_hash,
            "config": self.config,
            "stream": self.stream.name,
            "task_index": task.index,
            "stream_fingerprint": self.stream_fingerprint,
            "stream_description": _plain(describe_stream(self.stream)),
            "method": method,
            "unchanged_weights": unchanged,
            "results": self.results,
            "task_costs": self.task_costs,
        }
        state[_CHECKSUM_KEY] = content_sha256(state)
        atomic_torch_save(state, self._checkpoint_path(task.index))
        if self.keep_checkpoints > 0:
            for old in self._checkpoints()[: -self.keep_checkpoints]:
                old.unlink()

    def _interrupted(self, task: Task, error: BaseException) -> Interrupted:
        """Discards what the unfinished ``task`` left (its logs; its results are only written with its checkpoint)
        so that ``--resume`` starts it afresh, and says how far the run got."""
        finished = task.index + 1 if self._checkpoint_path(task.index).exists() else task.index
        if finished == task.index and is_rank_zero():
            for name in (f"task_{task.index:03d}", f"task_{task.index:03d}_consolidation"):
                shutil.rmtree(self.out / "logs" / name, ignore_errors=True)
        interrupted = error if isinstance(error, Interrupted) else Interrupted(signal.SIGTERM)
        interrupted.finished_tasks, interrupted.num_tasks, interrupted.out = finished, len(self.stream), self.out
        return interrupted

    def _checkpoint_path(self, index: int) -> Path:
        return self.out / "checkpoints" / f"task_{index:03d}.ckpt"

    def _checkpoints(self) -> list[Path]:
        return sorted((self.out / "checkpoints").glob("task_*.ckpt"))

    def _refuse_unsupported_distributed(self) -> None:
        """Several processes only with a DDP strategy and a method shown to give the single-process answer under it
        (``CILMethod.supports_distributed``); anything else is refused before a file is written."""
        first = self.stream.tasks[0]
        probe = self.trainer_factory(first.index, [], {**self.method.trainer_overrides(first), "logger": False})
        if probe.world_size <= 1:
            return
        if self.features.store is not None:
            raise ValueError(
                f"feature_cache is single-process for now ({probe.world_size} processes requested): drop "
                "--feature_cache, or run with --trainer.devices 1"
            )
        strategy = probe.strategy
        spawns = getattr(strategy, "_start_method", "popen") != "popen"  # ddp_spawn / ddp_fork / ddp_notebook
        if not isinstance(strategy, DDPStrategy) or spawns:  # FSDP, DeepSpeed: not DDPStrategy
            raise ValueError(
                f"cil runs several processes with Lightning's DDP strategy only (processes started once, by Lightning, "
                f"torchrun or SLURM), not {type(strategy).__name__}"
                f"{' starting them per call' if spawns else ''}; set --trainer.strategy ddp, or --trainer.devices 1"
            )
        blocker = self.method.distributed_blocker()
        if blocker is not None:
            raise ValueError(
                f"{blocker}; {probe.world_size} processes requested: run with --trainer.devices 1 "
                "(and --trainer.num_nodes 1)"
            )

    def _check_seed(self) -> None:
        """Every task's seed (``seed + i``) within numpy's range, checked before the first task is written."""
        last = MAX_SEED - (len(self.stream) - 1)
        if not 0 <= self.seed <= last:
            raise ValueError(
                f"seed_everything {self.seed} is out of range for {len(self.stream)} tasks: task i is seeded with "
                f"seed_everything + i, which numpy accepts from 0 to {MAX_SEED}; choose a seed from 0 to {last}"
            )

    def _check_out_is_writable(self) -> None:
        """Refuses a run directory that cannot be created or written, before anything is written."""
        existing = next(path for path in (self.out, *self.out.parents) if path.exists() or path == path.parent)
        if not existing.is_dir():
            raise ValueError(
                f"cannot create the run directory {str(self.out)!r}: {str(existing)!r} is a file, not a folder; "
                "choose another --out"
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(
                f"cannot write the run directory {str(self.out)!r}: {str(existing)!r} is not writable by this user; "
                "choose another --out, or make it writable"
            )

    def _check_fresh_out(self) -> int:
        if (self.out / "results.csv").exists() or self._checkpoints():
            raise FileExistsError(
                f"{str(self.out)!r} already holds a run; pass --resume true to continue it, or choose another --out"
            )
        return 0

    def _restore(self) -> int:
        """Loads the newest checkpoint; returns the index of the first task still to run."""
        checkpoints = self._checkpoints()
        if not checkpoints:
            log.info("no checkpoint in %s: starting the stream from the first task", self.out)
            return 0
        path = checkpoints[-1]
        try:  # weights_only: tensors and plain containers only, so a planted pickle cannot run code
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"cannot read checkpoint {str(path)!r} as a cil checkpoint ({reason[:200]}); "
                "delete it to resume from the one before"
            ) from error
        if not isinstance(state, dict) or not state.keys() >= _CHECKPOINT_KEYS:
            raise ValueError(
                f"{str(path)!r} is not a cil checkpoint (expected the keys {sorted(_CHECKPOINT_KEYS)}); "
                "delete it to resume from the one before"
            )
        self._verify_checksum(path, state)
        if state.get("config_hash") != self.config_hash:
            changed = _changed_keys(state.get("config", {}), self.config)
            raise ValueError(
                f"{str(path)!r} was written by a run with a different config "
                f"(differs in: {', '.join(changed) or '?'}); "
                "resume with the original config, or start a new run with another --out"
            )
        stored = state.get("stream_fingerprint")
        if stored is None:
            log.warning("%s predates stream fingerprints: the stream behind --out is not checked", path)
        elif stored != self.stream_fingerprint:
            before, now = (_by_task(d) for d in (state.get("stream_description", {}), describe_stream(self.stream)))
            changed = _changed_keys(before, now)
            raise ValueError(
                f"the stream changed since {str(path)!r} was written "
                f"(differs in: {', '.join(changed[:8]) or 'the labels'}); "
                "restore the data the run started with, or start a new run with another --out"
            )
        if state.get("unchanged_weights"):  # absent before checkpoints referenced weights by digest
            weights = state["method"]["weights"]
            state["method"]["weights"] = self.unchanged.fill(weights, state["unchanged_weights"], repr(str(path)))
        self.method.load_cil_state(state["method"], self.stream.tasks)
        self.results = list(state["results"])
        self.task_costs = list(state["task_costs"])
        start = int(state["task_index"]) + 1
        log.info("resuming %s after task %d of %d", self.out, start, len(self.stream))
        return start

    @staticmethod
    def _verify_checksum(path: Path, state: dict[str, Any]) -> None:
        """Refuses a checkpoint whose content is not what was written (a flipped bit in a tensor loads silently);
        removes the checksum from ``state``. Checkpoints written before checksums load with a warning."""
        stored = state.pop(_CHECKSUM_KEY, None)
        if stored is None:
            log.warning("%s predates checkpoint checksums: its content is not verified", path)
        elif stored != content_sha256(state):
            raise ValueError(
                f"checkpoint {str(path)!r} is corrupt: its content does not match the SHA-256 it was written with; "
                "delete it to resume from the one before"
            )


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists, other objects as strings), to compare with a checkpoint."""
    return json.loads(json.dumps(value, default=str))


def _by_task(description: dict[str, Any]) -> dict[str, Any]:
    """A stream description with its tasks keyed ``tasks.<index>``, so that a difference names the task and key."""
    plain = _plain(description)
    return {**plain, "tasks": {str(t.get("index", i)): t for i, t in enumerate(plain.get("tasks", []))}}


_CHECKPOINT_KEYS = frozenset({"config_hash", "config", "stream", "task_index", "method", "results", "task_costs"})
_CHECKSUM_KEY = "sha256"  # a checkpoint's entry holding the SHA-256 of all its other entries


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's per-Trainer banners and tips at WARNING, and its known harmless warnings off, for one run."""
    loggers = [logging.getLogger(f"lightning.{part}.utilities.rank_zero") for part in ("pytorch", "fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # lightning 2.6 + torch 2.14
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")  # 0 workers is measured faster
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def api_config(
    method: CILMethod,
    stream: Stream,
    data: DataConfig,
    seed: int,
    protocol: str,
    evaluate_future: bool = False,
    label_space: str = "seen",
) -> dict[str, Any]:
    """The configuration of a run built in Python, in the shape of ``cil run``'s: what ``config.yaml`` records and
    what ``--resume`` checks."""
    backbone = method.backbone
    config = {
        "seed_everything": seed,
        "protocol": protocol,
        "evaluate_future": evaluate_future,
        "label_space": label_space,
        "backbone": {"name": backbone.name, "weights": backbone.weights, "input_size": backbone.input_size},
        "method": {
            "class_path": f"{type(method).__module__}.{type(method).__qualname__}",
            "init_args": dict(method.hparams),
        },
        "stream": {"name": stream.name, **stream.metadata},
        "data": dataclasses.asdict(data),
    }
    return json.loads(json.dumps(config, default=str))  # plain YAML-able values, as the hash sees them


def describe_stream(stream: Stream) -> dict[str, Any]:
    """What the run saw: the stream's build facts (splits, caps, skipped tasks) and each task's size and origin."""
    tasks = [
        {
            "index": task.index,
            "name": task.name,
            "kind": task.kind,
            "num_classes": task.num_classes,
            "classes": list(task.classes),  # global ids, in the stream's class order
            "class_names": list(task.class_names),
            "n_train": len(task.train),  # type: ignore[arg-type]
            "n_test": len(task.test),  # type: ignore[arg-type]
            **{k: v for k, v in task.metadata.items() if k != "original_classes"},
        }
        for task in stream
    ]
    scenario = {} if stream.scenario == "class_incremental" else {"scenario": stream.scenario}  # older runs' hashes
    return {"name": stream.name, **scenario, "metadata": stream.metadata, "tasks": tasks}


def stream_fingerprint(stream: Stream) -> str:
    """SHA-256 of the stream as built: :func:`describe_stream` (task names, classes, class names, sizes) and every
    task's label sequence (train and test) where the data stores it, so a resumed run can tell that the data behind
    ``--out`` changed. Labels that only loading every image would give are left to the description (no decoding)."""
    digest = hashlib.sha256(json.dumps(describe_stream(stream), sort_keys=True, default=str).encode())
    for task in stream:
        for split in (task.train, task.test):
            try:
                labels = stored_targets(split)
            except (TypeError, ValueError):  # labels that are not one integer per image
                labels = None
            digest.update(b"-" if labels is None else np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def _on_gpu(trainer: L.Trainer) -> bool:
    """Whether the trainer's device is a CUDA GPU: its loaders then pin their batches (asynchronous copies)."""
    return trainer.strategy.root_device.type == "cuda"


def _cumulative_flops(task_costs: list[dict[str, Any]]) -> int | None:
    """Training FLOPs of all tasks so far; None if any task was not counted."""
    counts: list[Any] = [cost.get("train_flops") for cost in task_costs]
    return None if any(c is None for c in counts) else sum(int(c) for c in counts)


def _check_scenario(method: CILMethod, stream: Stream, protocol: str) -> None:
    if stream.scenario == "domain_incremental" and protocol == "task_incremental":
        raise ValueError(
            f"{stream.name!r} is domain-incremental: every task holds the same classes, so protocol task_incremental "
            "(choose among the image's own task's classes) would score exactly as class_incremental while its name "
            "says a head per domain; use protocol class_incremental"
        )
    if stream.scenario in method.supported_scenarios:
        return
    able = [name for name in list_methods() if stream.scenario in method_class(name).supported_scenarios]
    raise ValueError(
        f"{type(method).__name__} is not defined for {stream.scenario.replace('_', '-')} streams such as "
        f"{stream.name!r}; use one that is ({', '.join(able)}) or another stream"
    )


def _check_task_kinds(method: CILMethod, stream: Stream, protocol: str) -> None:
    multilabel = [task.name for task in stream if task.kind == "multilabel"]
    if not multilabel:
        return
    if protocol != "task_incremental":
        raise ValueError(
            f"stream {stream.name!r} has multi-label tasks ({', '.join(multilabel)}); they have no single label to "
            "predict in one growing label space, so run them with protocol: task_incremental (or drop them)"
        )
    if not method.supports_multilabel:
        raise ValueError(
            f"{type(method).__name__} cannot learn multi-label tasks ({', '.join(multilabel)}); use a method that "
            "can (finetune, simplecil) or drop those tasks from the stream"
        )


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changed: list[str] = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in _RUN_CONTROL_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed.extend(_changed_keys(a, b, f"{prefix}{key}."))
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed
