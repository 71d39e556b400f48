"""Class-incremental streams over real data that pip installs, so they run on machines without a dataset host.

* ``animal_mnist``: Animal-MNIST (PyPI ``animal-mnist``, MIT): 10,000 28x28 grey animal silhouettes, 1,000 per
  class. Install it with ``pip install --no-deps animal-mnist`` (its metadata pulls in tensorflow, which the data
  does not need; we read the gzip pickles directly).
* ``sklearn_digits``: scikit-learn's bundled UCI optical digits (1,797 8x8 images): the tiny test stream.

Neither ships a train / test split; both use a seeded stratified split (``split_seed``), fixed across runs.
"""

from __future__ import annotations

import gzip
import importlib
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cil.data import ArrayDataset, stratified_split
from cil.stream import Stream, register_stream
from cil.task import class_incremental_split

# Label order of the package's data (its README lists the classes alphabetically; checked against the images).
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def _load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        package = importlib.import_module("animal_mnist")
    except ImportError as error:
        raise FileNotFoundError(
            "the animal_mnist stream reads the PyPI package 'animal-mnist', which is not installed: "
            "pip install --no-deps animal-mnist"
        ) from error
    folder = Path(str(package.__file__)).parent / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as handle:
        images = np.asarray(pickle.load(handle), dtype=np.uint8)  # [10000, 28, 28]
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as handle:
        labels = np.asarray(pickle.load(handle), dtype=np.int64)  # [10000]
    return images, labels


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``uint8`` images ``[1797, 8, 8]`` (0..16 scaled to 0..255) and labels ``[1797]``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise FileNotFoundError("the sklearn digits need scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    return (digits.images * (255.0 / 16.0)).round().astype(np.uint8), digits.target.astype(np.int64)


def _array_stream(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    base: int,
    increment: int,
    seed: int | None,
    order: Sequence[int] | None,
    train_per_class: int | None,
    test_per_class: int | None,
    test_fraction: float,
    split_seed: int,
) -> Stream:
    train_idx, test_idx = stratified_split(labels, test_fraction, split_seed, train_per_class, test_per_class)
    train = ArrayDataset(images[train_idx], labels[train_idx])
    test = ArrayDataset(images[test_idx], labels[test_idx])
    tasks = class_incremental_split(
        train, test, base=base, increment=increment, seed=seed, order=order, class_names=class_names, name=name
    )
    options: dict[str, Any] = {"base": base, "increment": increment, "seed": seed, "split_seed": split_seed}
    options.update(train_per_class=train_per_class, test_per_class=test_per_class, test_fraction=test_fraction)
    return Stream(name=name, tasks=tuple(tasks), metadata=options)


@register_stream("animal_mnist")
def animal_mnist(
    base: int = 0,
    increment: int = 2,
    seed: int | None = None,
    order: list[int] | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Stream:
    """Animal-MNIST split into ``B{base}-Inc{increment}`` tasks (default: 5 tasks of 2 classes).

    Args:
        base: Classes in the first task (0: ``increment``).
        increment: Classes per later task.
        seed: Class-order seed (default: the run's seed).
        order: Explicit class order (a permutation of 0..9), overrides ``seed``.
        train_per_class: Cap on training images per class (default: all 800).
        test_per_class: Cap on test images per class (default: all 200).
        test_fraction: Share of each class held out for testing.
        split_seed: Seed of the train / test split.
    """
    images, labels = _load_animal_mnist()
    return _array_stream(
        "animal_mnist",
        images,
        labels,
        ANIMAL_MNIST_CLASSES,
        base=base,
        increment=increment,
        seed=seed,
        order=order,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        test_fraction=test_fraction,
        split_seed=split_seed,
    )


@register_stream("sklearn_digits")
def sklearn_digits(
    base: int = 0,
    increment: int = 2,
    seed: int | None = None,
    order: list[int] | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    test_fraction: float = 0.25,
    split_seed: int = 0,
) -> Stream:
    """scikit-learn's 8x8 digits (UCI optical digits, 1998) as a tiny class-incremental stream (for tests).

    Args:
        base: Classes in the first task (0: ``increment``).
        increment: Classes per later task.
        seed: Class-order seed (default: the run's seed).
        order: Explicit class order (a permutation of 0..9), overrides ``seed``.
        train_per_class: Cap on training images per class (default: all, about 135).
        test_per_class: Cap on test images per class (default: all, about 45).
        test_fraction: Share of each class held out for testing.
        split_seed: Seed of the train / test split.
    """
    images, labels = _load_sklearn_digits()
    return _array_stream(
        "sklearn_digits",
        images,
        labels,
        [str(d) for d in range(10)],
        base=base,
        increment=increment,
        seed=seed,
        order=order,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        test_fraction=test_fraction,
        split_seed=split_seed,
    )
