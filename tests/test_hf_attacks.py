"""Regression tests from an attack on the Hugging Face stream (``streams/hf.py``): each names a bug it found."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cil.engine import stream_fingerprint
from cil.feature_cache import sample_keys
from cil.stream import build_stream
from streams.hf import read_hf

datasets = pytest.importorskip("datasets")

NAMES = ["cat", "dog", "eel", "fox"]


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def _split(value: int, per_class: int = 2, **extra_columns: int) -> Any:
    """An Image column (pixels ``value + class``), a ClassLabel label and ``extra_columns``: name -> pixel value."""
    columns = ("image", *extra_columns)
    features = datasets.Features({**{c: datasets.Image() for c in columns}, "label": datasets.ClassLabel(names=NAMES)})
    rows: dict[str, list[Any]] = {c: [] for c in (*columns, "label")}
    for label in range(len(NAMES)):
        for _ in range(per_class):
            rows["image"].append(Image.fromarray(np.full((6, 6, 3), value + label, np.uint8)))
            for column, pixel in extra_columns.items():
                rows[column].append(Image.fromarray(np.full((6, 6, 3), pixel, np.uint8)))
            rows["label"].append(label)
    return datasets.Dataset.from_dict(rows, features=features)


def _save(path: Path, value: int = 0, **extra_columns: int) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    datasets.DatasetDict(
        {"train": _split(value, **extra_columns), "test": _split(value + 100, **extra_columns)}
    ).save_to_disk(str(path))
    return path


def test_feature_cache_keys_name_the_image_column(tmp_path: Path) -> None:
    """Keys were HF's fingerprint of the whole split (all columns) and the row: switching image_column between two
    runs with --feature_cache served the other column's embeddings (a blank column scored 100%)."""
    path = _save(tmp_path / "two", blank=0)
    splits = {"train": "train", "test": "test"}
    photos, _ = read_hf(str(path), splits=splits, image_column="image")
    blanks, _ = read_hf(str(path), splits=splits, image_column="blank")
    assert sample_keys(photos["train"]) is not None
    assert sample_keys(photos["train"]) != sample_keys(blanks["train"])


def test_a_split_glob_followed_by_a_star(tmp_path: Path) -> None:
    """``data/{split}*.parquet`` read the split name lazily as one character: splits ['t'] ("no split 'train'")."""
    folder = tmp_path / "pq"
    folder.mkdir()
    for name, value in (("train", 0), ("test", 100)):
        _split(value).to_parquet(str(folder / f"{name}.parquet"))
    stream = build_stream({"name": "hf_dataset", "path": str(folder / "{split}*.parquet"), "increment": 2})
    assert sum(len(task.train) for task in stream) == 8
    assert sum(len(task.test) for task in stream) == 8


@pytest.mark.parametrize("location", ["nothing/{split}-*.parquet", "empty"])
def test_an_optional_hf_task_whose_path_holds_no_data_is_skipped(tmp_path: Path, location: str) -> None:
    """A source.path glob that matches nothing (or an empty folder) passed the missing-data check and failed the
    build, so optional: true / skip_missing: true did not skip it (a task folder without source.path is skipped)."""
    (tmp_path / "empty").mkdir()
    _save(tmp_path / "animals")
    tasks = [
        {"dataset": "animals", "year": 2012, "root": "animals", "source": {"type": "hf_dataset"}},
        {"dataset": "later", "year": 2021, "optional": True, "source": {"type": "hf_dataset", "path": location}},
    ]
    stream = build_stream({"name": "dataset_stream", "root": str(tmp_path), "tasks": tasks})
    assert len(stream) == 1
    assert stream.metadata["skipped_tasks"][0]["dataset"] == "later"


def test_resume_tells_a_rewritten_hf_dataset(tmp_path: Path) -> None:
    """HF's fingerprint (the content id the feature cache trusts) was left out of the stream's fingerprint: a
    dataset rewritten at the same path with other pixels resumed silently (``cil run --resume true``)."""
    path = tmp_path / "animals"
    before = stream_fingerprint(build_stream({"name": "hf_dataset", "path": str(_save(path, 0)), "increment": 2}))
    after = stream_fingerprint(build_stream({"name": "hf_dataset", "path": str(_save(path, 50)), "increment": 2}))
    assert before != after
