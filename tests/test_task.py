"""Class orders, class-incremental splits, stratified splits and stream validation."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from torch.utils.data import Dataset

from cil.data import ArrayDataset, stratified_split
from cil.stream import Stream, build_stream
from cil.task import Task, class_incremental_split, class_order

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def labelled(per_class: int, num_classes: int = 10, classes: list[int] | None = None) -> ArrayDataset:
    """``per_class`` blank 4x4 images of each class, grouped by class (labels ``classes`` or ``0..num_classes-1``)."""
    labels = np.repeat(np.asarray(classes if classes is not None else range(num_classes)), per_class)
    return ArrayDataset(np.zeros((len(labels), 4, 4), np.uint8), labels)


def labels_of(dataset: Dataset[Any]) -> list[int]:
    return [label for _, label in dataset]  # type: ignore[attr-defined]


# --- class_order -----------------------------------------------------------------------------------------------


def test_seeded_class_order_is_reproducible_and_a_permutation() -> None:
    classes = list(range(10))
    first = class_order(classes, seed=1993)
    assert first == class_order(classes, seed=1993)
    assert sorted(first) == classes
    assert len(first) == 10
    assert first != classes  # a real shuffle
    assert first == [int(c) for c in np.random.RandomState(1993).permutation(10)]  # PILOT's np.random.seed(1993)


def test_different_seeds_give_different_orders() -> None:
    orders = {tuple(class_order(range(10), seed=seed)) for seed in range(5)}
    assert len(orders) == 5
    assert class_order(range(10), seed=1) != class_order(range(10), seed=2)


def test_seed_none_keeps_sorted_order() -> None:
    assert class_order(list(range(10))) == list(range(10))
    assert class_order([7, 3, 3, 5, 1]) == [1, 3, 5, 7]  # unique, sorted
    assert class_order([7, 3, 5], seed=None) == [3, 5, 7]


def test_explicit_order_is_used_as_given_and_overrides_the_seed() -> None:
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert class_order(range(10), order=order) == order
    assert class_order(range(10), seed=3, order=order) == order


@pytest.mark.parametrize(
    ("order", "problem"),
    [
        (list(range(9)), r"missing \[9\]"),
        ([*range(10), 10], r"not in the dataset \[10\]"),
        ([*range(10), 3], r"repeated \[3\]"),
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 8], r"missing \[9\]; repeated \[8\]"),
    ],
)
def test_invalid_explicit_order_names_the_problem(order: list[int], problem: str) -> None:
    with pytest.raises(ValueError, match=r"must be a permutation of the dataset's 10 classes") as error:
        class_order(range(10), order=order)
    assert error.match(problem)


# --- class_incremental_split -----------------------------------------------------------------------------------


def test_labels_are_remapped_to_contiguous_global_ids_in_order_of_appearance() -> None:
    order = [3, 7, 0, 9, 1, 5, 2, 8, 6, 4]
    tasks = class_incremental_split(labelled(3), labelled(2), increment=4, order=order)
    assert [t.classes for t in tasks] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert [t.metadata["original_classes"] for t in tasks] == [(3, 7, 0, 9), (1, 5, 2, 8), (6, 4)]
    for task in tasks:
        assert sorted(set(labels_of(task.train))) == list(task.classes)
        assert sorted(set(labels_of(task.test))) == list(task.classes)
    # original 3 -> global 0, 7 -> 1, 0 -> 2, 9 -> 3; samples keep the dataset's order (grouped by original class)
    assert labels_of(tasks[0].train) == [2, 2, 2, 0, 0, 0, 1, 1, 1, 3, 3, 3]  # originals 0, 3, 7, 9 in dataset order


def test_non_contiguous_original_labels_are_remapped() -> None:
    original = [10, 20, 30, 40]
    tasks = class_incremental_split(labelled(2, classes=original), labelled(1, classes=original), increment=2)
    assert [t.metadata["original_classes"] for t in tasks] == [(10, 20), (30, 40)]
    assert labels_of(tasks[0].train) == [0, 0, 1, 1]
    assert labels_of(tasks[1].train) == [2, 2, 3, 3]
    assert labels_of(tasks[1].test) == [2, 3]


def test_first_task_holds_the_first_increment_classes_of_the_seeded_order() -> None:
    tasks = class_incremental_split(labelled(2), labelled(1), increment=3, seed=11)
    order = class_order(range(10), seed=11)
    assert tasks[0].metadata["original_classes"] == tuple(order[:3])
    assert tasks[1].metadata["original_classes"] == tuple(order[3:6])
    assert sum((t.metadata["original_classes"] for t in tasks), ()) == tuple(order)
    again = class_incremental_split(labelled(2), labelled(1), increment=3, seed=11)
    assert [t.metadata["original_classes"] for t in again] == [t.metadata["original_classes"] for t in tasks]


@pytest.mark.parametrize(
    ("base", "increment", "sizes"),
    [
        (0, 2, [2, 2, 2, 2, 2]),
        (0, 1, [1] * 10),  # B0-Inc1: single-class tasks
        (4, 3, [4, 3, 3]),  # base > 0
        (0, 4, [4, 4, 2]),  # last task smaller
        (0, 3, [3, 3, 3, 1]),
        (10, 5, [10]),  # base covers everything
        (2, 20, [2, 8]),  # increment larger than what is left
    ],
)
def test_task_sizes(base: int, increment: int, sizes: list[int]) -> None:
    tasks = class_incremental_split(labelled(3), labelled(2), base=base, increment=increment, seed=0)
    assert [t.num_classes for t in tasks] == sizes
    assert [t.index for t in tasks] == list(range(len(sizes)))
    assert [t.name for t in tasks] == [f"stream/t{i}" for i in range(len(sizes))]
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    assert [t.classes for t in tasks] == [tuple(range(s, s + n)) for s, n in zip(starts, sizes, strict=True)]
    assert [len(t.train) for t in tasks] == [3 * n for n in sizes]
    assert [len(t.test) for t in tasks] == [2 * n for n in sizes]
    Stream("split", tuple(tasks))  # a valid stream


def test_single_class_tasks_yield_one_label_each() -> None:
    tasks = class_incremental_split(labelled(4), labelled(2), increment=1, seed=2)
    assert len(tasks) == 10
    for t, task in enumerate(tasks):
        assert task.classes == (t,)
        assert labels_of(task.train) == [t] * 4
        assert labels_of(task.test) == [t] * 2
    order = class_order(range(10), seed=2)
    assert [t.metadata["original_classes"][0] for t in tasks] == order


def test_streams_with_fewer_than_five_classes() -> None:
    tasks = class_incremental_split(labelled(2, num_classes=3), labelled(1, num_classes=3), increment=2)
    assert [t.classes for t in tasks] == [(0, 1), (2,)]
    assert labels_of(tasks[1].train) == [2, 2]
    two = class_incremental_split(labelled(2, num_classes=2), labelled(1, num_classes=2), increment=1)
    assert [t.classes for t in two] == [(0,), (1,)]
    one = class_incremental_split(labelled(2, num_classes=1), labelled(1, num_classes=1), increment=5)
    assert [t.classes for t in one] == [(0,)]
    assert Stream("one", tuple(one)).num_classes == 1


def test_every_sample_appears_in_exactly_one_task() -> None:
    rng = np.random.RandomState(0)
    train_labels = rng.randint(0, 10, size=200)
    train_labels[:10] = np.arange(10)  # every class present
    test_labels = np.concatenate([np.arange(10), rng.randint(0, 10, size=40)])
    train = ArrayDataset(np.zeros((200, 4, 4), np.uint8), train_labels)
    test = ArrayDataset(np.zeros((50, 4, 4), np.uint8), test_labels)
    tasks = class_incremental_split(train, test, base=4, increment=3, seed=7)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        indices = [i for task in tasks for i in getattr(task, split).indices]
        assert sorted(indices) == list(range(len(labels)))  # a partition: no duplicates, nothing missing
        for task in tasks:
            subset = getattr(task, split)
            assert set(labels[subset.indices].tolist()) <= set(task.metadata["original_classes"])
            assert len(subset) == int(np.isin(labels, task.metadata["original_classes"]).sum())


def test_class_names_follow_the_order() -> None:
    order = [4, 0, 8, 2, 6, 1, 3, 5, 7, 9]
    tasks = class_incremental_split(labelled(1), labelled(1), increment=4, order=order, class_names=NAMES)
    assert tasks[0].class_names == ("four", "zero", "eight", "two")
    assert tasks[1].class_names == ("six", "one", "three", "five")
    assert tasks[2].class_names == ("seven", "nine")
    default = class_incremental_split(labelled(1), labelled(1), increment=4, order=order)
    assert default[0].class_names == ("4", "0", "8", "2")  # original labels as strings


def test_targets_can_be_given_instead_of_read() -> None:
    class NoTargets(Dataset[tuple[np.ndarray, int]]):
        def __init__(self, labels: list[int]) -> None:
            self.labels_ = labels

        def __len__(self) -> int:
            return len(self.labels_)

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            return np.zeros((4, 4), np.uint8), self.labels_[i]

    train, test = NoTargets([1, 0, 1, 2, 0, 2]), NoTargets([2, 1, 0])
    read = class_incremental_split(train, test, increment=2)  # labels read by iterating
    given = class_incremental_split(train, test, increment=2, train_targets=[1, 0, 1, 2, 0, 2], test_targets=[2, 1, 0])
    for tasks in (read, given):
        assert tasks[0].train.indices == [0, 1, 2, 4] and tasks[1].train.indices == [3, 5]
        assert labels_of(tasks[0].train) == [1, 0, 1, 0] and labels_of(tasks[1].test) == [2]


def test_metadata_is_copied_into_every_task() -> None:
    tasks = class_incremental_split(labelled(1), labelled(1), increment=5, name="toy", metadata={"source": "unit"})
    assert [t.name for t in tasks] == ["toy/t0", "toy/t1"]
    assert [t.metadata["source"] for t in tasks] == ["unit", "unit"]
    assert tasks[0].metadata["original_classes"] == (0, 1, 2, 3, 4)


def test_a_class_without_test_images_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"toy: classes \[9\] have training images but no test images"):
        class_incremental_split(labelled(3), labelled(1, num_classes=9), increment=2, name="toy")


def test_a_class_with_test_images_only_is_rejected() -> None:
    """Its test images would belong to no task and silently never be evaluated."""
    with pytest.raises(ValueError, match=r"toy: classes \[9\] have test images but no training images"):
        class_incremental_split(labelled(3, num_classes=9), labelled(1), increment=2, name="toy")


@pytest.mark.parametrize("increment", [0, -1])
def test_increment_below_one_is_rejected(increment: int) -> None:
    with pytest.raises(ValueError, match=f"increment must be >= 1, got {increment}"):
        class_incremental_split(labelled(3), labelled(1), increment=increment)


@pytest.mark.parametrize("base", [-1, 11])
def test_base_outside_the_class_count_is_rejected(base: int) -> None:
    with pytest.raises(ValueError, match=rf"base must be in \[0, 10\], got {base}"):
        class_incremental_split(labelled(3), labelled(1), base=base, increment=2)


def test_task_checks_one_name_per_class() -> None:
    with pytest.raises(ValueError, match="2 classes but 1 names"):
        Task(index=0, name="t", classes=(0, 1), class_names=("a",), train=labelled(1), test=labelled(1))


# --- stratified_split ------------------------------------------------------------------------------------------

UNEVEN = np.repeat(np.arange(4), [10, 7, 3, 20])  # class sizes 10, 7, 3, 20


def test_stratified_split_is_deterministic_for_a_seed() -> None:
    train, test = stratified_split(UNEVEN, 0.3, seed=4)
    again_train, again_test = stratified_split(UNEVEN, 0.3, seed=4)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(test, again_test)
    other_train, other_test = stratified_split(UNEVEN, 0.3, seed=5)
    assert not np.array_equal(test, other_test) and not np.array_equal(train, other_train)
    assert len(other_test) == len(test) and len(other_train) == len(train)


def test_stratified_split_is_disjoint_complete_and_sorted() -> None:
    train, test = stratified_split(UNEVEN, 0.3, seed=0)
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted([*train.tolist(), *test.tolist()]) == list(range(40))
    assert train.tolist() == sorted(train.tolist()) and test.tolist() == sorted(test.tolist())


def test_stratified_split_is_stratified() -> None:
    train, test = stratified_split(UNEVEN, 0.3, seed=0)
    # round(0.3 * n) test items per class: round(3.0) = 3, round(2.1) = 2, round(0.9) = 1, round(6.0) = 6
    assert np.bincount(UNEVEN[test], minlength=4).tolist() == [3, 2, 1, 6]
    assert np.bincount(UNEVEN[train], minlength=4).tolist() == [7, 5, 2, 14]


def test_stratified_split_keeps_at_least_one_test_item_per_class() -> None:
    labels = np.repeat(np.arange(3), [10, 2, 1])
    train, test = stratified_split(labels, 0.1, seed=0)
    # round(1.0) = 1, round(0.2) = 0 -> 1, round(0.1) = 0 -> 1
    assert np.bincount(labels[test], minlength=3).tolist() == [1, 1, 1]
    assert np.bincount(labels[train], minlength=3).tolist() == [9, 1, 0]


def test_stratified_split_caps_per_class() -> None:
    train, test = stratified_split(UNEVEN, 0.3, seed=0, train_per_class=4, test_per_class=2)
    assert np.bincount(UNEVEN[train], minlength=4).tolist() == [4, 4, 2, 4]  # class 2 has only 2 train items
    assert np.bincount(UNEVEN[test], minlength=4).tolist() == [2, 2, 1, 2]  # class 2 has only 1 test item
    assert not set(train.tolist()) & set(test.tolist())
    # capped items are a subset of the uncapped split with the same seed
    full_train, full_test = stratified_split(UNEVEN, 0.3, seed=0)
    assert set(train.tolist()) <= set(full_train.tolist()) and set(test.tolist()) <= set(full_test.tolist())


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_stratified_split_rejects_bad_fractions(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        stratified_split(UNEVEN, fraction, seed=0)


# --- Stream and build_stream -----------------------------------------------------------------------------------


def toy_tasks() -> list[Task]:
    return class_incremental_split(labelled(2), labelled(1), increment=5)


def test_a_valid_stream() -> None:
    stream = Stream("toy", tuple(toy_tasks()))
    assert len(stream) == 2 and stream.num_classes == 10
    assert [t.index for t in stream] == [0, 1] and stream[1].classes == (5, 6, 7, 8, 9)


def test_stream_rejects_a_wrong_task_index() -> None:
    tasks = toy_tasks()
    with pytest.raises(ValueError, match=r"stream 'bad': task stream/t1 has index 1, expected 0"):
        Stream("bad", (tasks[1],))
    with pytest.raises(ValueError, match="has index 0, expected 1"):
        Stream("bad", (tasks[0], tasks[0]))


def test_stream_rejects_non_contiguous_class_ids() -> None:
    tasks = toy_tasks()
    shifted = dataclasses.replace(tasks[1], index=0)  # classes 5..9 at the start of a stream
    with pytest.raises(ValueError, match=r"global ids must be contiguous in order of appearance, starting at 0"):
        Stream("bad", (shifted,))
    gap = dataclasses.replace(tasks[1], classes=(6, 7, 8, 9, 10))
    with pytest.raises(ValueError, match="starting at 5"):
        Stream("bad", (tasks[0], gap))


def test_stream_rejects_no_tasks() -> None:
    with pytest.raises(ValueError, match="has no tasks"):
        Stream("empty", ())


def test_build_stream_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(KeyError, match=r"stream 'sklearn_digits' has no option\(s\) \['incremnt'\]") as error:
        build_stream({"name": "sklearn_digits", "incremnt": 3})
    valid = "['base', 'increment', 'order', 'split_seed', 'test_fraction', 'test_per_class', 'train_per_class']"
    assert f"valid options: {valid}" in str(error.value)


def test_build_stream_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(KeyError, match=r"unknown stream 'sklearn_digit'\. Did you mean 'sklearn_digits'\?") as error:
        build_stream({"name": "sklearn_digit"})
    assert "animal_mnist" in str(error.value) and "Registered:" in str(error.value)
    with pytest.raises(KeyError, match="Did you mean 'animal_mnist'"):
        build_stream({"name": "animal_mnst"})


def test_build_stream_needs_a_name() -> None:
    with pytest.raises(KeyError, match="needs a 'name'"):
        build_stream({"increment": 2})


def test_build_stream_sklearn_digits_seeded_order() -> None:
    stream = build_stream({"name": "sklearn_digits", "increment": 3}, seed=1)
    assert stream.name == "sklearn_digits"
    assert [t.num_classes for t in stream] == [3, 3, 3, 1] and stream.num_classes == 10
    assert sum(len(t.train) + len(t.test) for t in stream) == 1797  # scikit-learn's digits, all images
    assert stream.metadata["seed"] == 1
    originals = [t.metadata["original_classes"] for t in stream]
    assert sum(originals, ()) == tuple(class_order(range(10), seed=1))
    again = build_stream({"name": "sklearn_digits", "increment": 3}, seed=1)
    assert [t.metadata["original_classes"] for t in again] == originals
    other = build_stream({"name": "sklearn_digits", "increment": 3}, seed=2)
    assert [t.metadata["original_classes"] for t in other] != originals
    # a seed in the spec wins over the run's seed
    pinned = build_stream({"name": "sklearn_digits", "increment": 3, "seed": 1}, seed=2)
    assert [t.metadata["original_classes"] for t in pinned] == originals
    image, label = stream[3].train[0]
    assert image.shape == (8, 8) and image.dtype == np.uint8 and label == 9
