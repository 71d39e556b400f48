"""Tasks and class-incremental splits.

A *stream* is an ordered sequence of :class:`Task` values. Labels are global: every task's dataset yields labels
in one contiguous label space ``0..C-1`` numbered in order of first appearance along the stream, so task ``t``
of a ``B{base}-Inc{inc}`` split owns a contiguous block of ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Dataset

__all__ = ["TASK_KINDS", "LabelMapped", "Task", "class_incremental_split", "class_order", "dataset_targets"]

TASK_KINDS = ("multiclass", "multilabel")


@dataclass(frozen=True, eq=False)
class Task:
    """One task of a stream.

    Attributes:
        index: Position in the stream, from 0.
        name: Human-readable name, e.g. ``"animal_mnist/t2"``.
        classes: Global ids of the classes this task introduces (its *new classes*).
        class_names: One name per entry of ``classes``.
        train: Training split; yields ``(image, global_label)``.
        test: Test split; yields ``(image, global_label)``.
        val: Optional validation split (NEVIS's dev split).
        metadata: Free-form facts about the task (source dataset, year, domain).
        kind: ``"multiclass"`` (one label per image, scored by top-1 accuracy) or ``"multilabel"`` (the datasets
            yield a multi-hot ``float`` vector over this task's classes, in the order of ``classes``; scored by
            mean average precision, as NEVIS scores Pascal VOC and CelebA).
    """

    index: int
    name: str
    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    train: Dataset[Any]
    test: Dataset[Any]
    val: Dataset[Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = "multiclass"

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if len(self.classes) != len(self.class_names):
            raise ValueError(f"task {self.name}: {len(self.classes)} classes but {len(self.class_names)} names")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class LabelMapped(Dataset[tuple[Any, int]]):
    """A subset of a labelled dataset whose labels are mapped to global ids (``label_map[original] -> global``)."""

    def __init__(self, dataset: Dataset[Any], indices: Sequence[int], label_map: dict[int, int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.dataset[self.indices[i]]
        return image, self.label_map[int(label)]


def dataset_targets(dataset: Dataset[Any]) -> np.ndarray:
    """Integer labels of a map-style dataset, read from ``targets`` / ``labels`` when present (no image decoding)."""
    stored = stored_targets(dataset)
    if stored is not None:
        return stored
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]


def stored_targets(dataset: Dataset[Any]) -> np.ndarray | None:
    """Integer labels the dataset stores (``targets``, ``labels``, ImageFolder's ``samples``...), or None where only
    loading every item would tell them."""
    stored = _stored_targets(dataset)
    if stored is None and isinstance(dataset, LabelMapped) and (inner := _stored_targets(dataset.dataset)) is not None:
        stored = np.asarray([dataset.label_map[int(label)] for label in inner[dataset.indices]], dtype=np.int64)
    return stored


def _stored_targets(dataset: Dataset[Any]) -> np.ndarray | None:
    for attribute in ("targets", "labels", "_labels", "y"):  # "y": torchvision's Caltech101 / Caltech256
        values = getattr(dataset, attribute, None)
        if values is not None:
            return np.asarray(values, dtype=np.int64)
    samples = getattr(dataset, "samples", None) or getattr(dataset, "_samples", None)  # ImageFolder, StanfordCars
    if samples is not None:
        return np.asarray([label for _, label in samples], dtype=np.int64)
    return None


def class_order(classes: Sequence[int], seed: int | None = None, order: Sequence[int] | None = None) -> list[int]:
    """The order in which classes enter the stream: an explicit ``order`` (validated) or a seeded permutation.

    ``seed=None`` keeps the dataset's own order. PILOT shuffles with ``np.random.seed(1993)``; pass that seed to
    reproduce its orders.
    """
    present = sorted(int(c) for c in set(classes))
    if order is not None:
        requested = [int(c) for c in order]
        missing = sorted(set(present) - set(requested))
        unknown = sorted(set(requested) - set(present))
        repeated = sorted({c for c in requested if requested.count(c) > 1})
        if missing or unknown or repeated:
            problems = []
            if missing:
                problems.append(f"missing {missing}")
            if unknown:
                problems.append(f"not in the dataset {unknown}")
            if repeated:
                problems.append(f"repeated {repeated}")
            raise ValueError(
                f"class_order must be a permutation of the dataset's {len(present)} classes {present}: "
                + "; ".join(problems)
            )
        return requested
    if seed is None:
        return present
    return [present[i] for i in np.random.RandomState(seed).permutation(len(present))]


def _task_sizes(num_classes: int, base: int, increment: int) -> list[int]:
    if increment < 1:
        raise ValueError(f"increment must be >= 1, got {increment}")
    if not 0 <= base <= num_classes:
        raise ValueError(f"base must be in [0, {num_classes}], got {base}")
    sizes = [base] if base > 0 else []
    remaining = num_classes - base
    while remaining > 0:
        sizes.append(min(increment, remaining))
        remaining -= sizes[-1]
    return sizes


def class_incremental_split(
    train: Dataset[Any],
    test: Dataset[Any],
    *,
    base: int = 0,
    increment: int,
    seed: int | None = None,
    order: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    name: str = "stream",
    train_targets: Sequence[int] | None = None,
    test_targets: Sequence[int] | None = None,
    metadata: dict[str, Any] | None = None,
) -> list[Task]:
    """Splits one labelled dataset into ``B{base}-Inc{increment}`` class-incremental tasks.

    ``base=0`` means every task has ``increment`` classes (the last one may have fewer). Labels are remapped to
    contiguous global ids in order of appearance: the first class of the order becomes 0.

    Args:
        train: Training dataset yielding ``(image, label)`` with the dataset's own labels.
        test: Test dataset with the same label space.
        base: Number of classes in the first task (0: same as ``increment``).
        increment: Number of classes in each later task.
        seed: Seed of the class order; ignored when ``order`` is given.
        order: Explicit class order, a permutation of all classes.
        class_names: Names indexed by the dataset's own labels.
        name: Prefix of the task names.
        train_targets: Labels of ``train`` if known (saves a pass over the data).
        test_targets: Labels of ``test`` if known.
        metadata: Copied into every task's metadata.
    """
    y_train = np.asarray(train_targets, dtype=np.int64) if train_targets is not None else dataset_targets(train)
    y_test = np.asarray(test_targets, dtype=np.int64) if test_targets is not None else dataset_targets(test)
    train_classes, test_classes = set(np.unique(y_train).tolist()), set(np.unique(y_test).tolist())
    if train_classes - test_classes:
        raise ValueError(
            f"{name}: classes {sorted(train_classes - test_classes)} have training images but no test images"
        )
    if test_classes - train_classes:
        raise ValueError(
            f"{name}: classes {sorted(test_classes - train_classes)} have test images but no training images, so no "
            "task could learn them; drop them from the test set or add training images"
        )
    ordered = class_order(np.unique(y_train).tolist(), seed=seed, order=order)
    label_map = {original: new for new, original in enumerate(ordered)}
    sizes = _task_sizes(len(ordered), base, increment)
    tasks = []
    start = 0
    for index, size in enumerate(sizes):
        originals = ordered[start : start + size]
        wanted = set(originals)
        tasks.append(
            Task(
                index=index,
                name=f"{name}/t{index}",
                classes=tuple(range(start, start + size)),
                class_names=tuple(class_names[c] if class_names is not None else str(c) for c in originals),
                train=LabelMapped(train, np.flatnonzero(np.isin(y_train, list(wanted))).tolist(), label_map),
                test=LabelMapped(test, np.flatnonzero(np.isin(y_test, list(wanted))).tolist(), label_map),
                metadata={**(metadata or {}), "original_classes": tuple(originals)},
            )
        )
        start += size
    return tasks
