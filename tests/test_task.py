"""Class orders, class-incremental splits, stratified splits and stream validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cil.data import ArrayDataset, stratified_split
from cil.stream import Stream, build_stream
from cil.task import class_incremental_split, class_order


def labelled(per_class: int, num_classes: int = 10) -> ArrayDataset:
    labels = np.repeat(np.arange(num_classes), per_class)
    return ArrayDataset(np.zeros((len(labels), 4, 4), np.uint8), labels)


def test_class_order_seeded_explicit_and_validated() -> None:
    classes = list(range(10))
    assert class_order(classes, seed=1993) == class_order(classes, seed=1993)
    assert sorted(class_order(classes, seed=1993)) == classes
    assert class_order(classes, seed=1) != class_order(classes, seed=2)
    assert class_order(classes) == classes
    assert class_order(classes, order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]) == list(range(9, -1, -1))
    with pytest.raises(ValueError, match=r"missing \[9\]"):
        class_order(classes, order=list(range(9)))
    with pytest.raises(ValueError, match=r"not in the dataset \[10\]"):
        class_order(classes, order=[*range(10), 10])
    with pytest.raises(ValueError, match=r"repeated \[3\]"):
        class_order(classes, order=[*range(10), 3])


@pytest.mark.parametrize(
    ("base", "increment", "sizes"),
    [(0, 2, [2] * 5), (0, 1, [1] * 10), (4, 3, [4, 3, 3]), (0, 4, [4, 4, 2]), (0, 3, [3, 3, 3, 1])],
)
def test_split_sizes_and_contiguous_labels(base: int, increment: int, sizes: list[int]) -> None:
    train, test = labelled(6), labelled(2)
    order = class_order(range(10), seed=5)
    tasks = class_incremental_split(train, test, base=base, increment=increment, seed=5, class_names=list("abcdefghij"))
    assert [t.num_classes for t in tasks] == sizes
    start = 0
    for task in tasks:
        assert task.classes == tuple(range(start, start + task.num_classes))
        assert {label for _, label in task.train} == set(task.classes)  # global, contiguous ids
        assert {label for _, label in task.test} == set(task.classes)
        assert len(task.train) == 6 * task.num_classes and len(task.test) == 2 * task.num_classes
        assert task.metadata["original_classes"] == tuple(order[start : start + task.num_classes])
        assert task.class_names == tuple("abcdefghij"[c] for c in task.metadata["original_classes"])
        start += task.num_classes
    assert start == 10


def test_split_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no test images"):
        class_incremental_split(labelled(3), labelled(1, num_classes=9), increment=2)
    with pytest.raises(ValueError, match="increment"):
        class_incremental_split(labelled(3), labelled(1), increment=0)


def test_stratified_split() -> None:
    labels = np.repeat(np.arange(4), 10)
    train, test = stratified_split(labels, 0.2, seed=0)
    again = stratified_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(train, again[0])
    assert not set(train) & set(test) and len(train) + len(test) == 40
    assert np.bincount(labels[test]).tolist() == [2, 2, 2, 2]
    capped_train, capped_test = stratified_split(labels, 0.2, seed=0, train_per_class=3, test_per_class=1)
    assert (
        np.bincount(labels[capped_train]).tolist() == [3] * 4 and np.bincount(labels[capped_test]).tolist() == [1] * 4
    )


def test_stream_validation_and_registry_errors() -> None:
    tasks = class_incremental_split(labelled(2), labelled(1), increment=5)
    with pytest.raises(ValueError, match="has index 1, expected 0"):
        Stream("bad", (tasks[1],))
    shifted = dataclasses.replace(tasks[1], index=0)
    with pytest.raises(ValueError, match="contiguous"):
        Stream("bad", (shifted,))
    with pytest.raises(KeyError, match="Did you mean 'sklearn_digits'"):
        build_stream({"name": "sklearn_digit"})
    with pytest.raises(KeyError, match=r"valid options: \['base'"):
        build_stream({"name": "sklearn_digits", "incremnt": 3})
    stream = build_stream({"name": "sklearn_digits", "increment": 3}, seed=1)
    assert [t.num_classes for t in stream] == [3, 3, 3, 1] and stream.num_classes == 10
    again = build_stream({"name": "sklearn_digits", "increment": 3}, seed=1)
    assert stream[0].metadata["original_classes"] == again[0].metadata["original_classes"]
