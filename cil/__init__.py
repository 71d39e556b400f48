"""cil: class-incremental and continual learning with pre-trained models."""

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
