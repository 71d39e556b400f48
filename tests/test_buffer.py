"""The reservoir buffer: uniform inclusion (a statistical test with a check of its power), class balancing, state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chi2

from cil.buffer import ReservoirBuffer
from cil.data import ArrayDataset


def _tasks(sizes: list[int], labels_per_task: list[list[int]] | None = None) -> list[ArrayDataset]:
    """Datasets whose images are their global offer index (so a kept image tells which offer it was)."""
    datasets, start = [], 0
    for i, size in enumerate(sizes):
        images = np.arange(start, start + size).reshape(size, 1, 1)
        labels = labels_per_task[i] if labels_per_task else [i] * size
        datasets.append(ArrayDataset(images, labels))
        start += size
    return datasets


def _inclusion_counts(fill, trials: int, sizes: list[int], capacity: int) -> np.ndarray:
    counts = np.zeros(sum(sizes))
    for seed in range(trials):
        kept = fill(seed, _tasks(sizes), capacity)
        counts[kept] += 1
    return counts


def _uniformity_p_value(counts: np.ndarray, trials: int, capacity: int) -> float:
    """Chi-square test that every image is kept with probability capacity / N (binomial variance per image)."""
    p = capacity / len(counts)
    statistic = float((((counts - trials * p) ** 2) / (trials * p * (1 - p))).sum())
    return float(chi2.sf(statistic, df=len(counts) - 1))


def _reservoir(seed: int, tasks: list[ArrayDataset], capacity: int) -> list[int]:
    buffer = ReservoirBuffer(capacity, seed=seed)
    for index, task in enumerate(tasks):
        buffer.add_task(task, index)
    return [int(image.item()) for image in buffer.images]


def _keep_latest(seed: int, tasks: list[ArrayDataset], capacity: int) -> list[int]:
    """A biased memory (the last images offered), to show the test can tell."""
    offered = np.concatenate([task.images.ravel() for task in tasks])
    return offered[-capacity:].tolist()


def test_reservoir_keeps_every_image_with_equal_probability() -> None:
    sizes, capacity, trials = [20, 30, 10], 15, 1500  # three tasks of different sizes
    counts = _inclusion_counts(_reservoir, trials, sizes, capacity)
    assert counts.sum() == trials * capacity  # always full
    assert _uniformity_p_value(counts, trials, capacity) > 1e-3
    biased = _inclusion_counts(_keep_latest, trials, sizes, capacity)
    assert _uniformity_p_value(biased, trials, capacity) < 1e-6  # the same test rejects a recency-biased memory


def test_each_task_is_represented_in_proportion_to_its_size() -> None:
    sizes, capacity = [100, 300, 200], 60
    shares = []
    for seed in range(200):
        buffer = ReservoirBuffer(capacity, seed=seed)
        for index, task in enumerate(_tasks(sizes)):
            buffer.add_task(task, index)
        shares.append([buffer.task_counts().get(i, 0) for i in range(3)])
    np.testing.assert_allclose(np.mean(shares, axis=0), [10, 30, 20], atol=1.0)


def test_class_balanced_sampling_protects_rare_classes() -> None:
    labels = [0] * 500 + [1, 2, 3, 4] * 20  # one common class, four rare ones (20 images each)
    task = ArrayDataset(np.arange(len(labels)).reshape(-1, 1, 1), labels)
    plain, balanced = ReservoirBuffer(50, seed=0), ReservoirBuffer(50, seed=0, class_balanced=True)
    plain.add_task(task, 0)
    balanced.add_task(task, 0)
    assert plain.class_counts()[0] >= 35  # ~43 expected: the common class crowds the rare ones out
    assert set(balanced.class_counts().values()) == {10}  # an equal share for every class
    assert len(balanced) == 50


def test_state_dict_round_trip_continues_identically() -> None:
    tasks = _tasks([40, 40])
    original = ReservoirBuffer(25, seed=7)
    original.add_task(tasks[0], 0)
    original.record_logits([0, 1], torch.randn(2, 3))
    restored = ReservoirBuffer(25, seed=123)
    restored.load_state_dict(original.state_dict())
    for buffer in (original, restored):
        buffer.add_task(tasks[1], 1)
    assert [i.item() for i in restored.images] == [i.item() for i in original.images]
    assert restored.sample_slots(8).tolist() == original.sample_slots(8).tolist()
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(10).load_state_dict(original.state_dict())


def test_stored_logits_are_padded_and_masked() -> None:
    buffer = ReservoirBuffer(3, seed=0)
    buffer.add_task(_tasks([3])[0], 0)
    buffer.record_logits([0], torch.tensor([[1.0, 2.0]]))  # recorded when 2 classes were seen
    buffer.record_logits([1], torch.tensor([[3.0, 4.0, 5.0, 6.0]]))
    targets, mask = buffer.stored_logits(torch.tensor([0, 1, 2]), num_classes=4)
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [False] * 4]
    assert targets[0, :2].tolist() == [1.0, 2.0] and targets[1].tolist() == [3.0, 4.0, 5.0, 6.0]
    x, y = buffer.batch(torch.tensor([2, 0]), lambda image: torch.as_tensor(image, dtype=torch.float32))
    assert x.shape == (2, 1, 1) and y.tolist() == [0, 0]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ReservoirBuffer(0)


def test_a_buffer_checkpoint_loads_without_unpickling_objects(tmp_path: Path) -> None:
    """Arrays, PIL images and tensors survive ``torch.save`` / ``torch.load(weights_only=True)`` as what they were."""
    buffer = ReservoirBuffer(capacity=3, seed=0)
    images = [np.arange(12, dtype=np.uint8).reshape(2, 2, 3), Image.new("L", (4, 3), color=7), torch.ones(3, 2, 2)]
    for label, image in enumerate(images):
        buffer.add_task([(image, label)], task_index=label)  # type: ignore[arg-type]
    torch.save(buffer.state_dict(), tmp_path / "buffer.pt")
    restored = ReservoirBuffer(capacity=3, seed=1)
    restored.load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=True))
    assert isinstance(restored.images[0], np.ndarray) and np.array_equal(restored.images[0], images[0])
    assert isinstance(restored.images[1], Image.Image) and restored.images[1].mode == "L"
    assert np.array_equal(np.asarray(restored.images[1]), np.asarray(images[1]))
    assert torch.equal(restored.images[2], images[2]) and restored.labels == buffer.labels
    assert torch.equal(restored.sample_slots(3), buffer.sample_slots(3))  # the generators continue alike
