"""NEVIS-style streams: the published specs, splits and modes, missing data, user ImageFolder streams."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cil.cli import main
from cil.stream import build_stream
from cil.task import LabelMapped
from streams.nevis import _partition, read_spec

ROOT = Path(__file__).resolve().parents[1]

# NEVIS_STREAM_PER_YEAR[TINY] and [SHORT] in google-deepmind/dm_nevis (dm_nevis/streams/nevis_stream.py).
NEVIS_TINY = [
    (2004, "MNIST"),
    (2010, "Caltech 101"),
    (2014, "Pascal 2012"),
    (2018, "CIFAR 100"),
    (2018, "MNIST"),
    (2018, "ISBI-ISIC 2017 melanoma classification challenge"),
    (2020, "CUB 200"),
]
NEVIS_SHORT = [
    (2004, "COIL 100"), (2004, "MNIST"),
    (2006, "Pascal 2005"), (2006, "Caltech cars, motorbikes"), (2006, "UIUC cars"),
    (2009, "Pascal 2006"),
    (2010, "Caltech 101"),
    (2011, "Graz-02"), (2011, "15 Scenes"), (2011, "Pascal 2007"), (2011, "LFW"),
    (2013, "sketch dataset"), (2013, "Brodatz"),
    (2014, "ImageNet"), (2014, "Pascal 2012"), (2014, "Caltech 256"),
    (2018, "CIFAR 100"), (2018, "CIFAR 10"), (2018, "USPS"), (2018, "MNIST"), (2018, "MNIST-m"),
    (2018, "Office Caltech"), (2018, "PACS"), (2018, "ISBI-ISIC 2017 melanoma classification challenge"),
    (2019, "Fashion MNIST"),
    (2020, "Stanford Dogs"), (2020, "CUB 200"), (2020, "Stanford Cars"), (2020, "FGVC Aircraft"),
]  # fmt: skip
MULTILABEL = {"Pascal 2007", "Pascal 2012", "CelebA"}


@pytest.mark.parametrize(("variant", "expected"), [("tiny", NEVIS_TINY), ("short", NEVIS_SHORT)])
def test_published_specs_match_the_nevis_order_and_years(variant: str, expected: list[tuple[int, str]]) -> None:
    name, dev_stop_year, tasks = read_spec(f"nevis_{variant}")
    assert name == f"nevis_{variant}" and dev_stop_year == 2020
    assert [(t.year, t.dataset) for t in tasks] == expected
    assert {t.dataset for t in tasks if t.kind == "multilabel"} == MULTILABEL & {d for _, d in expected}


def test_full_spec_has_every_nevis_task_in_year_order() -> None:
    _, _, tasks = read_spec("nevis_full")
    assert len(tasks) == 106  # 106 tasks from 97 datasets (some datasets recur in later years)
    assert len({t.dataset for t in tasks}) == 97
    years = [t.year for t in tasks]
    assert years == sorted(years) and years[0] == 1992 and years[-1] == 2021
    roots = {}
    for task in tasks:  # a recurring dataset reads one folder
        assert roots.setdefault(task.dataset, task.root) == task.root


@pytest.mark.parametrize("variant", ["tiny", "short", "full"])
def test_an_empty_root_gives_one_error_listing_every_missing_dataset(variant: str, tmp_path: Path) -> None:
    _, _, tasks = read_spec(f"nevis_{variant}")
    with pytest.raises(FileNotFoundError) as error:
        build_stream({"name": "nevis", "variant": variant, "root": str(tmp_path)})
    message = str(error.value)
    assert f"{len(tasks)} of {len(tasks)} tasks have no data" in message
    assert message.count("\n  - ") == len(tasks)
    assert str(tmp_path / tasks[0].root) in message  # type: ignore[operator]
    assert "skip_missing" in message


def _folders(root: Path, classes: list[str], per_class: int, seed: int, size: int = 12) -> None:
    """Class folders of small PNGs whose mean grey level depends on the class (so they can be learned)."""
    rng = np.random.RandomState(seed)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(40 + 60 * index, 10, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.fixture
def user_stream(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    _folders(data / "leaves", ["oak", "elm", "ash"], 25, seed=0)  # no official split
    _folders(data / "insects" / "train", ["ant", "bee"], 20, seed=1)  # official train / test split
    _folders(data / "insects" / "test", ["ant", "bee"], 6, seed=2)
    return data


def user_spec(data: Path, **options: object) -> dict[str, object]:
    tasks = [
        {"dataset": "insects", "year": 2019, "root": "insects"},
        {"dataset": "leaves", "year": 2012, "root": "leaves"},
    ]
    return {"name": "dataset_stream", "root": str(data), "tasks": tasks, **options}


def test_a_stream_of_your_own_image_folders(user_stream: Path) -> None:
    stream = build_stream(user_spec(user_stream))
    assert [t.name for t in stream] == ["leaves_2012", "insects_2019"]  # ordered by year
    leaves, insects = stream.tasks
    assert leaves.classes == (0, 1, 2) and insects.classes == (3, 4)
    assert sorted(leaves.class_names) == ["ash", "elm", "oak"]
    # leaves: no official split, so 20 % of each class is held out for testing (5 of 25) and 68 % trains (17)
    assert len(leaves.test) == 3 * 5 and len(leaves.train) == 3 * 17
    # insects: the official test folder is the test split; train + dev (85 %) of the train folder trains
    assert len(insects.test) == 2 * 6 and len(insects.train) == 2 * 17
    assert isinstance(leaves.train, LabelMapped) and isinstance(leaves.test, LabelMapped)
    assert not set(leaves.train.indices) & set(leaves.test.indices)
    assert {label for _, label in insects.test} == {3, 4}


def test_dev_mode_trains_on_train_validates_on_dev_and_scores_dev_test(user_stream: Path) -> None:
    stream = build_stream(user_spec(user_stream, mode="dev", dev_stop_year=2015))
    assert [t.name for t in stream] == ["leaves_2012"]  # 2019 is held out of the dev stream
    leaves = stream[0]
    assert leaves.val is not None
    parts = [set(leaves.train.indices), set(leaves.val.indices), set(leaves.test.indices)]  # type: ignore[attr-defined]
    assert [len(p) for p in parts] == [3 * 14, 3 * 3, 3 * 3]  # 56 / 12 / 12 % of 25 per class
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def test_missing_user_folders_are_listed_or_skipped_and_recorded(user_stream: Path) -> None:
    spec = user_spec(user_stream)
    spec["tasks"] = [*spec["tasks"], {"dataset": "birds", "year": 2020, "root": "birds"}]  # type: ignore[misc]
    with pytest.raises(FileNotFoundError, match=r"1 of 3 tasks have no data(.|\n)*birds \(2020\)"):
        build_stream(spec)
    stream = build_stream({**spec, "skip_missing": True})
    assert len(stream) == 2
    assert [s["dataset"] for s in stream.metadata["skipped_tasks"]] == ["birds"]


def test_bad_task_keys_say_what_is_valid(user_stream: Path) -> None:
    spec = user_spec(user_stream)
    spec["tasks"] = [{"dataset": "leaves", "year": 2012, "path": "leaves"}]
    with pytest.raises(KeyError, match=r"unknown task key.*'path'.*valid keys"):
        build_stream(spec)


def test_partition_is_stratified_seeded_and_exhaustive() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 7, 40])
    parts = _partition(labels, (0.7, 0.15, 0.15), seed=3)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    for c, n in enumerate([10, 20, 7, 40]):
        counts = [int((labels[p] == c).sum()) for p in parts]
        assert sum(counts) == n and abs(counts[0] - 0.7 * n) <= 1
    again = _partition(labels, (0.7, 0.15, 0.15), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(parts[1], _partition(labels, (0.7, 0.15, 0.15), seed=4)[1])


def test_offline_stream_is_in_publication_order_with_its_own_classes() -> None:
    stream = build_stream({"name": "nevis_offline", "train_per_class": 5, "test_per_class": 3})
    years = [t.metadata["year"] for t in stream]
    assert years == sorted(years) and len(stream) >= 4  # Fashion-MNIST is optional (apt)
    names = [t.metadata["dataset"] for t in stream]
    assert names[:3] == ["UCI optical digits", "MNIST", "Font glyphs"] and names[-1] == "Animal-MNIST"
    glyphs = stream[2]
    assert glyphs.num_classes == 26 and glyphs.class_names[0] == "A" and len(glyphs.train) == 26 * 5
    skipped = [s["dataset"] for s in stream.metadata["skipped_tasks"]]
    assert skipped == ([] if "Fashion-MNIST" in names else ["Fashion-MNIST"])
    dev = build_stream({"name": "nevis_offline", "mode": "dev", "train_per_class": 5, "test_per_class": 3})
    assert [t.metadata["year"] for t in dev] == [1998, 1998, 2004]  # stops before the spec's dev_stop_year


@pytest.mark.parametrize("protocol", ["task_incremental", "class_incremental"])
def test_offline_nevis_config_runs_under_both_protocols(protocol: str, tmp_path: Path) -> None:
    config = str(ROOT / "configs/experiments/nevis_offline.yaml")
    tiny = str(ROOT / "tests" / "data" / "tiny_overrides.yaml")
    stream = "{name: nevis_offline, train_per_class: 4, test_per_class: 4, stop_year: 2005}"
    args = ["run", "--config", config, "--config", tiny, "--stream", stream, "--protocol", protocol]
    args += ["--count_flops", "true"]  # the tiny overrides switch counting off
    assert main([*args, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["protocol"] == protocol and summary["num_tasks"] == 3
    assert summary["train_flops"] > 0 and 0 <= summary["avg_error"] <= 100
    described = json.loads((tmp_path / "stream.json").read_text())
    assert [t["year"] for t in described["tasks"]] == [1998, 1998, 2004]


def test_user_streams_keep_their_listed_order_only_when_asked(user_stream: Path) -> None:
    spec = user_spec(user_stream)
    spec["tasks"] = [{"dataset": "insects", "root": "insects"}, {"dataset": "leaves", "root": "leaves"}]
    with pytest.raises(ValueError, match=r"no year.*keep_order: true"):
        build_stream(spec)
    stream = build_stream({**spec, "keep_order": True, "stream_name": "mine"})
    assert stream.name == "mine" and [t.name for t in stream] == ["insects", "leaves"]
