"""Streams: ordered task sequences, built by name from a registry of factories."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cil._registry import Registry
from cil.task import Task

__all__ = ["SCENARIOS", "Stream", "build_stream", "list_streams", "register_stream"]

SCENARIOS = ("class_incremental", "domain_incremental")
"""How a stream's tasks relate. ``class_incremental``: every task brings classes no earlier task had, numbered
on from the last (a class-incremental split, a NEVIS stream of datasets). ``domain_incremental``: every task
holds the same classes, in a new domain (UCI digits, then MNIST, then rendered digits; CORe50, DomainNet)."""


@dataclass(frozen=True, eq=False)
class Stream:
    """An ordered sequence of tasks. ``metadata`` records how it was built (split, subset sizes, ...); ``scenario``
    is one of :data:`SCENARIOS`."""

    name: str
    tasks: tuple[Task, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    scenario: str = "class_incremental"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(f"stream {self.name!r} has no tasks")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"stream {self.name!r}: scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        first, expected = self.tasks[0], 0  # expected: the first new id of a class-incremental task
        for index, task in enumerate(self.tasks):
            if task.index != index:
                raise ValueError(f"stream {self.name!r}: task {task.name} has index {task.index}, expected {index}")
            if self.scenario == "domain_incremental":
                self._check_shared_label_space(task, first)
                continue
            if task.classes != tuple(range(expected, expected + task.num_classes)):
                raise ValueError(
                    f"stream {self.name!r}: task {task.name} has classes {task.classes}; global ids must be "
                    f"contiguous in order of appearance, starting at {expected}"
                )
            expected += task.num_classes

    def _check_shared_label_space(self, task: Task, first: Task) -> None:
        if task.kind != "multiclass":
            raise ValueError(f"stream {self.name!r}: a domain-incremental task must be multiclass ({task.name})")
        if task.classes != tuple(range(first.num_classes)) or task.class_names != first.class_names:
            raise ValueError(
                f"stream {self.name!r} is domain-incremental, so every task must hold the classes 0..C-1 with "
                f"the same names as the first; task {task.name} has {task.classes} {task.class_names}"
            )

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]

    @property
    def label_tasks(self) -> tuple[Task, ...]:
        """The tasks whose classes make up the label space, in global id order: every task, or the first domain of
        a domain-incremental stream (the others repeat its classes)."""
        return self.tasks[:1] if self.scenario == "domain_incremental" else self.tasks

    @property
    def num_classes(self) -> int:
        """Classes in the stream's label space (the tasks' classes together)."""
        return sum(task.num_classes for task in self.label_tasks)


StreamFactory = Callable[..., Stream]
_STREAMS = Registry[StreamFactory]("stream", "streams")


def register_stream(name: str) -> Callable[[StreamFactory], StreamFactory]:
    """Registers a factory ``(**options) -> Stream`` under ``name``; configs choose it with ``stream.name``."""
    return _STREAMS.register(name)


def list_streams() -> list[str]:
    return _STREAMS.names()


def build_stream(spec: Mapping[str, Any], seed: int | None = None) -> Stream:
    """Builds the stream ``spec["name"]`` with the other keys as options.

    ``seed`` (the run's seed) fixes the class order unless the spec sets ``seed`` itself. Unknown options are an
    error that lists the valid ones.
    """
    if "name" not in spec:
        raise KeyError(f"the stream config needs a 'name' (one of {list_streams()}), got keys {sorted(spec)}")
    options = {k: v for k, v in spec.items() if k != "name"}
    factory = _STREAMS.get(str(spec["name"]))
    parameters = inspect.signature(factory).parameters
    if "seed" in parameters and "seed" not in options:
        options["seed"] = seed
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        valid = sorted(p for p in parameters if p != "seed")
        raise KeyError(f"stream {spec['name']!r} has no option(s) {unknown}; valid options: {valid}")
    return factory(**options)
