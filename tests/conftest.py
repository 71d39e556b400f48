"""Shared fixtures: a tiny timm ViT, a tiny real-data stream, a fast CPU trainer factory."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest

from cil.backbones import Backbone
from cil.data import DataConfig
from cil.engine import Engine, TrainerFactory, make_trainer_factory
from cil.method import CILMethod
from cil.stream import Stream, build_stream
from cil.task import Task

TINY_VIT: dict[str, Any] = {
    "name": "vit_tiny_patch16_224",
    "input_size": 16,
    "model_kwargs": {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2},
}


def tiny_backbone(**model_kwargs: Any) -> Backbone:
    """The tiny ViT; ``model_kwargs`` override its timm arguments (e.g. ``global_pool="avg"``)."""
    return Backbone(**{**TINY_VIT, "model_kwargs": {**TINY_VIT["model_kwargs"], **model_kwargs}})


def empty_tasks(*class_counts: int) -> list[Task]:
    """Tasks of ``class_counts`` consecutive classes with no images: enough for ``grow`` / ``begin_task``, for tests
    that hand a method its features directly."""
    tasks, first = [], 0
    for index, count in enumerate(class_counts):
        classes = tuple(range(first, first + count))
        names = tuple(map(str, classes))
        tasks.append(Task(index=index, name=f"t{index}", classes=classes, class_names=names, train=[], test=[]))  # type: ignore[arg-type]
        first += count
    return tasks


def tiny_stream(seed: int = 0, **options: Any) -> Stream:
    """scikit-learn's 8x8 digits, 5 tasks of 2 classes, 40 train / 15 test images per class."""
    spec = {"name": "sklearn_digits", "increment": 2, "train_per_class": 40, "test_per_class": 15, **options}
    return build_stream(spec, seed=seed)


# Random resized crops of 8x8 digits destroy them; the tiny stream trains without augmentation.
TINY_DATA = DataConfig(batch_size=32, eval_batch_size=256, augment=False)


def crash_during(method: CILMethod, task_index: int) -> CILMethod:
    """Makes ``method`` raise ``RuntimeError("simulated crash")`` when the engine begins task ``task_index``."""
    original = method.before_task

    def before_task(task: Task) -> None:
        if task.index == task_index:
            raise RuntimeError("simulated crash")
        original(task)

    method.before_task = before_task  # type: ignore[method-assign]
    return method


def cpu_trainers(out: Path, **trainer: Any) -> TrainerFactory:
    kwargs = {"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False}
    kwargs["log_every_n_steps"] = 1
    return make_trainer_factory(out, {**kwargs, **trainer}, logger="csv")


def run_engine(out: Path, method: CILMethod, stream: Stream, **engine: Any) -> Engine:
    """``method`` through ``stream`` on the CPU with the tiny data settings (seed 7); returns the finished engine."""
    finished = Engine(
        method,
        stream,
        out,
        trainer_factory=cpu_trainers(out),
        data=TINY_DATA,
        seed=7,
        config={"test": "tiny"},
        **engine,
    )
    finished.run()
    return finished


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
