"""The domain-incremental digits stream (``digits_domains``), the glyph sources it shares, and Stream's checks."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cil.data import Transformed, build_transform
from cil.stream import Stream, build_stream
from cil.task import Task, dataset_targets
from streams._sources import OFFLINE_SOURCES

DIGITS = tuple(str(d) for d in range(10))
# sha256 of dejavu_glyphs' images, labels and class names, computed before the renderer took any characters
# (Pillow 13.0 / FreeType 2.14.3, matplotlib 3.11.2's fonts); another FreeType or font version may render otherwise.
GLYPHS_SHA256 = "71ed5a6f91c414967a9b98d9a6e04c46e5f1f70451ff8ab58caea5c2ee690b04"


@pytest.fixture(scope="module")
def stream() -> Stream:
    return build_stream({"name": "digits_domains"})


def test_three_domains_share_the_digits(stream: Stream) -> None:
    assert stream.scenario == "domain_incremental" and stream.num_classes == 10
    assert [t.name for t in stream] == [f"digits_domains/{d}" for d in ("uci_digits", "mnist", "rendered_digits")]
    assert [t.metadata["dataset"] for t in stream] == ["UCI optical digits", "MNIST", "Rendered digits"]
    assert stream.metadata == {"train_per_class": 60, "test_per_class": 30, "split_seed": 0,
                               "domains": ["uci_digits", "mnist", "rendered_digits"]}  # fmt: skip
    for task, side in zip(stream, (8, 28, 32), strict=True):
        assert task.classes == tuple(range(10)) and task.class_names == DIGITS
        assert task.train[0][0].shape == (side, side)  # kept as the source gives it


def test_caps_hold_and_train_and_test_are_disjoint(stream: Stream) -> None:
    for task in stream:
        # every source has more than 60 + 30 images per digit, so the caps are met exactly
        assert np.bincount(dataset_targets(task.train), minlength=10).tolist() == [60] * 10, task.name
        assert np.bincount(dataset_targets(task.test), minlength=10).tolist() == [30] * 10, task.name
        assert task.train.dataset is task.test.dataset  # no source has a test split: one cut of one array
        assert not set(task.train.indices) & set(task.test.indices), task.name


def test_same_splits_as_nevis_offline(stream: Stream) -> None:
    nevis = build_stream({"name": "nevis_offline", "stop_year": 1999})  # its UCI digits and MNIST tasks
    for ours, theirs in zip(stream, nevis, strict=False):
        assert ours.train.indices == theirs.train.indices and ours.test.indices == theirs.test.indices


def test_the_engine_transform_takes_every_domain(stream: Stream) -> None:
    transform = build_transform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=False)
    for task in stream:
        image, label = Transformed(task.test, transform)[0]
        assert image.shape == (3, 16, 16) and 0 <= label < 10


def test_builds_the_same_twice(stream: Stream) -> None:
    again = build_stream({"name": "digits_domains"})
    for a, b in zip(stream, again, strict=True):
        assert a.train.indices == b.train.indices and a.test.indices == b.test.indices
        assert np.array_equal(dataset_targets(a.train), dataset_targets(b.train))
        assert np.array_equal(a.train[5][0], b.train[5][0])
    other = build_stream({"name": "digits_domains", "split_seed": 1})
    assert other[0].train.indices != stream[0].train.indices


def test_domains_choose_and_order() -> None:
    stream = build_stream({"name": "digits_domains", "domains": ["rendered_digits", "mnist"],
                           "train_per_class": 2, "test_per_class": 1})  # fmt: skip
    assert [t.metadata["domain"] for t in stream] == ["rendered_digits", "mnist"]
    assert [t.index for t in stream] == [0, 1] and stream.metadata["domains"] == ["rendered_digits", "mnist"]
    assert [len(t.train) for t in stream] == [20, 20] and [len(t.test) for t in stream] == [10, 10]


@pytest.mark.parametrize("domains", [["mnist", "svhn"], ["mnist", "mnist"], []])
def test_bad_domains_name_the_valid_ones(domains: list[str]) -> None:
    with pytest.raises(ValueError, match=r"choose from \['uci_digits', 'mnist', 'rendered_digits'\]"):
        build_stream({"name": "digits_domains", "domains": domains})


def test_letters_are_rendered_as_before() -> None:
    glyphs = OFFLINE_SOURCES["dejavu_glyphs"][1]()
    images, labels = glyphs.train.images, glyphs.labels["train"]
    assert images.shape == (26 * 120, 32, 32) and glyphs.class_names[0] == "A" and glyphs.test is None
    digest = hashlib.sha256(images.tobytes() + labels.tobytes() + "|".join(glyphs.class_names).encode())
    assert digest.hexdigest() == GLYPHS_SHA256


def test_digits_are_rendered_with_their_labels() -> None:
    digits = OFFLINE_SOURCES["dejavu_digits"][1]()
    assert digits.class_names == list(DIGITS) and digits.train.images.shape == (2000, 32, 32)
    assert np.bincount(digits.labels["train"]).tolist() == [200] * 10
    assert digits.train.images.max() == 255  # ink drawn, not blank canvases


def _task(index: int, classes: tuple[int, ...], names: tuple[str, ...]) -> Task:
    data = TensorDataset(torch.zeros(len(classes), 1, 2, 2), torch.tensor(classes))
    return Task(index=index, name=f"t{index}", classes=classes, class_names=names, train=data, test=data)


@pytest.mark.parametrize(
    ("classes", "names"), [((0, 1, 2), ("a", "b", "c")), ((1, 2), ("a", "b")), ((0, 1), ("a", "x"))]
)
def test_a_domain_incremental_stream_refuses_other_classes(classes: tuple[int, ...], names: tuple[str, ...]) -> None:
    first = _task(0, (0, 1), ("a", "b"))
    assert Stream("ok", (first, _task(1, (0, 1), ("a", "b"))), scenario="domain_incremental").num_classes == 2
    with pytest.raises(ValueError, match=r"domain-incremental, so every task must hold the classes 0\.\.C-1"):
        Stream("bad", (first, _task(1, classes, names)), scenario="domain_incremental")
