"""cil: class-incremental and continual learning with pre-trained models.

The public names below are imported on first use (PEP 562), so ``import cil`` and the analysis commands
(``cil summarize``, ``cil table``, ``cil plot``) do not pay for torch, Lightning and timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cil.backbones import Backbone, list_offline_weights, register_offline_weights
    from cil.buffer import ReservoirBuffer
    from cil.data import DataConfig
    from cil.engine import Engine, make_trainer_factory
    from cil.method import CILMethod, create_method, list_methods, register_method
    from cil.metrics import TaskAccuracy
    from cil.results import load_runs, load_summaries, selected_ranks
    from cil.sensitivity import SensitivityRecorder, rank_modules
    from cil.stream import Stream, build_stream, list_streams, register_stream
    from cil.task import Task, class_incremental_split

__version__ = "0.1.0"

_SOURCES = {
    "Backbone": "cil.backbones",
    "list_offline_weights": "cil.backbones",
    "register_offline_weights": "cil.backbones",
    "ReservoirBuffer": "cil.buffer",
    "DataConfig": "cil.data",
    "Engine": "cil.engine",
    "make_trainer_factory": "cil.engine",
    "CILMethod": "cil.method",
    "create_method": "cil.method",
    "list_methods": "cil.method",
    "register_method": "cil.method",
    "TaskAccuracy": "cil.metrics",
    "load_runs": "cil.results",
    "load_summaries": "cil.results",
    "selected_ranks": "cil.results",
    "SensitivityRecorder": "cil.sensitivity",
    "rank_modules": "cil.sensitivity",
    "Stream": "cil.stream",
    "build_stream": "cil.stream",
    "list_streams": "cil.stream",
    "register_stream": "cil.stream",
    "Task": "cil.task",
    "class_incremental_split": "cil.task",
}

__all__ = [
    "Backbone",
    "CILMethod",
    "DataConfig",
    "Engine",
    "ReservoirBuffer",
    "SensitivityRecorder",
    "Stream",
    "Task",
    "TaskAccuracy",
    "build_stream",
    "class_incremental_split",
    "create_method",
    "list_methods",
    "list_offline_weights",
    "list_streams",
    "load_runs",
    "load_summaries",
    "make_trainer_factory",
    "rank_modules",
    "register_method",
    "register_offline_weights",
    "register_stream",
    "selected_ranks",
]


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'cil' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
