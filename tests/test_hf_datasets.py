"""Hugging Face datasets as a class-incremental stream (``hf_dataset``) and as a NEVIS-style source."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cil.cli import main
from cil.stream import Stream, build_stream
from streams.hf import HFImages

datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny_overrides.yaml")
NAMES = ("cat", "dog", "eel", "fox")


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def _value(label: int, i: int, split: str) -> int:
    """The pixel value of image ``i`` of class ``label``: tells an image's class and split back from its pixels."""
    return 40 * label + 2 * i + (split == "test")


def _split(split: str, per_class: int, classes: int, arrays: bool = False) -> dict[str, list[Any]]:
    images: list[Any] = []
    labels = []
    for label in range(classes):
        for i in range(per_class):
            pixels = np.full((6, 6, 3), _value(label, i, split), dtype=np.uint8)  # [H, W, C]
            images.append(pixels[..., 0] if arrays and i % 2 else pixels if arrays else Image.fromarray(pixels))
            labels.append(label)
    return {"image": images, "label": labels}


def _dataset_dict(names: tuple[str, ...] = NAMES, train: int = 3, test: int = 2, **splits: int) -> Any:
    """train / test (and ``splits``: name -> images per class) with an Image column and a ClassLabel label."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    sizes = {"train": train, "test": test, **splits}
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(_split(name, n, len(names)), features=features)
            for name, n in sizes.items()
            if n
        }
    )


def _saved(tmp_path: Path, data: Any = None, name: str = "animals") -> Path:
    (data if data is not None else _dataset_dict()).save_to_disk(str(tmp_path / name))
    return tmp_path / name


def _stream(path: Path | str, **options: Any) -> Stream:
    return build_stream({"name": "hf_dataset", "path": str(path), "increment": 2, **options})


def _pixel_classes(dataset: Any) -> set[int]:
    """The original classes of a task split's images, read from their pixels."""
    return {int(np.asarray(image)[0, 0, 0]) // 40 for image, _ in dataset}


# ---- the stream ----------------------------------------------------------------------------------------------------
def test_class_names_come_from_the_class_label_and_tasks_hold_their_classes(tmp_path: Path) -> None:
    stream = _stream(_saved(tmp_path))
    assert stream.name == "animals" and len(stream) == 2
    assert [task.class_names for task in stream] == [("cat", "dog"), ("eel", "fox")]
    assert [(len(task.train), len(task.test)) for task in stream] == [(6, 4), (6, 4)]
    image, label = stream[1].train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 2
    assert _pixel_classes(stream[1].train) == {2, 3} and _pixel_classes(stream[1].test) == {2, 3}
    assert {int(np.asarray(image)[0, 0, 0]) % 2 for image, _ in stream[0].test} == {1}  # from the test split


def test_base_increment_and_an_explicit_order(tmp_path: Path) -> None:
    path = _saved(tmp_path, _dataset_dict(("a", "b", "c", "d", "e")))
    stream = _stream(path, base=2, increment=1, order=[4, 2, 0, 1, 3])
    assert [task.class_names for task in stream] == [("e", "c"), ("a",), ("b",), ("d",)]
    assert [task.classes for task in stream] == [(0, 1), (2,), (3,), (4,)]
    assert [(len(task.train), len(task.test)) for task in stream] == [(6, 4), (3, 2), (3, 2), (3, 2)]
    assert _pixel_classes(stream[0].train) == {4, 2} and [label for _, label in stream[0].train] == [1] * 3 + [0] * 3
    assert _pixel_classes(stream[3].test) == {3}


def test_per_class_caps(tmp_path: Path) -> None:
    stream = _stream(_saved(tmp_path), train_per_class=2, test_per_class=1)
    assert [(len(task.train), len(task.test)) for task in stream] == [(4, 2), (4, 2)]


@pytest.mark.parametrize("layout", ["folder", "glob"])
def test_parquet_files(tmp_path: Path, layout: str) -> None:
    for split, data in _dataset_dict().items():
        data.to_parquet(str(tmp_path / "pq" / f"{split}-00000-of-00001.parquet"))
    path = tmp_path / "pq" if layout == "folder" else tmp_path / "pq" / "{split}-*.parquet"
    stream = _stream(path, cache_dir=str(tmp_path / "cache"))
    assert stream.name == "pq" and [task.class_names for task in stream] == [("cat", "dog"), ("eel", "fox")]
    assert [(len(task.train), len(task.test)) for task in stream] == [(6, 4), (6, 4)]


def test_integer_labels_and_array_images(tmp_path: Path) -> None:
    features = datasets.Features({"pixels": datasets.List(datasets.List(datasets.List(datasets.Value("int64")))),
                                  "y": datasets.Value("int64")})  # fmt: skip
    rgb = {split: _split(split, 2, 3) for split in ("train", "test")}
    data = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"pixels": [np.asarray(im).tolist() for im in d["image"]], "y": d["label"]}, features=features
            )
            for split, d in rgb.items()
        }
    )
    path = _saved(tmp_path, data)
    stream = _stream(path, image_column="pixels", label_column="y", increment=3)
    assert stream[0].class_names == ("0", "1", "2")
    image, _ = stream[0].train[0]
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (6, 6, 3)  # [H, W, C]
    named = _stream(path, image_column="pixels", label_column="y", increment=3, class_names=["x", "y", "z"])
    assert named[0].class_names == ("x", "y", "z")


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_the_same_data_is_the_same_stream_and_rewritten_data_is_another(tmp_path: Path, layout: str) -> None:
    """A resumed run compares stream fingerprints: loading the same files again must give the same one (or no HF
    run could resume), and the same path rewritten with other pixels another (HF's content ids are in it)."""
    from cil.engine import stream_fingerprint

    def write(data: Any) -> Path:
        if layout == "save_to_disk":
            return _saved(tmp_path, data)
        for split, rows in data.items():
            rows.to_parquet(str(tmp_path / "pq" / f"{split}-00000.parquet"))
        return tmp_path / "pq"

    path = write(_dataset_dict())
    first = stream_fingerprint(_stream(path, cache_dir=str(tmp_path / "cache")))
    assert stream_fingerprint(_stream(path, cache_dir=str(tmp_path / "cache"))) == first
    other = _dataset_dict()
    other["train"] = other["train"].map(lambda row: {"image": Image.new("RGB", (6, 6), 7)})  # other pixels, same labels
    if layout == "save_to_disk":
        import shutil

        shutil.rmtree(path)
    write(other)
    assert stream_fingerprint(_stream(path, cache_dir=str(tmp_path / "cache"))) != first
    assert _stream(path, cache_dir=str(tmp_path / "cache")).metadata["image_column"] == "image"


def test_one_split_holds_out_a_seeded_share_of_every_class(tmp_path: Path) -> None:
    path = _saved(tmp_path, datasets.DatasetDict({"train": _dataset_dict(train=10)["train"]}))
    stream = _stream(path, test_split=None, test_fraction=0.2)
    assert [(len(task.train), len(task.test)) for task in stream] == [(16, 4), (16, 4)]  # 8 + 2 per class
    again = _stream(path, test_split=None, test_fraction=0.2)
    assert [task.test.indices for task in again] == [task.test.indices for task in stream]  # type: ignore[attr-defined]
    train_pixels = {int(np.asarray(image)[0, 0, 0]) for task in stream for image, _ in task.train}
    test_pixels = {int(np.asarray(image)[0, 0, 0]) for task in stream for image, _ in task.test}
    assert not train_pixels & test_pixels  # no image in both
    with pytest.raises(ValueError, match="has no split 'test'"):
        _stream(path)


def test_channels_first_arrays_are_refused(tmp_path: Path) -> None:
    features = datasets.Features(
        {"image": datasets.Array3D((3, 6, 6), "uint8"), "label": datasets.ClassLabel(names=list(NAMES))}
    )
    rows = {"image": [np.zeros((3, 6, 6), np.uint8)] * 8, "label": [0, 1, 2, 3] * 2}
    data = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=features) for s in ("train", "test")})
    stream = _stream(_saved(tmp_path, data))
    with pytest.raises(ValueError, match=r"not an image; .* \[H, W, C\] with C 1, 3 or 4"):
        stream[0].train[0]


def test_building_the_stream_decodes_no_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError("decoded an image")

    monkeypatch.setattr("streams.hf._image", refuse)
    stream = _stream(_saved(tmp_path))  # labels come from the label column alone
    with pytest.raises(AssertionError, match="decoded an image"):
        stream[0].train[0]


def _bad(tmp_path: Path, case: str) -> dict[str, Any]:
    if case == "missing path":
        return {"path": str(tmp_path / "nowhere" / "animals")}
    if case == "no test split":
        return {"path": str(_saved(tmp_path, _dataset_dict(test=0, validation=2)))}
    if case == "string labels":
        text = datasets.Dataset.from_dict({"image": _split("train", 1, 2)["image"], "label": ["cat", "dog"]})
        return {"path": str(_saved(tmp_path, datasets.DatasetDict({"train": text, "test": text})))}
    if case == "hidden test labels":
        data = _dataset_dict()
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
        hidden = datasets.Dataset.from_dict({"image": _split("test", 1, 1)["image"], "label": [-1]}, features=features)
        data["test"] = hidden.cast(data["train"].features)
        return {"path": str(_saved(tmp_path, data))}
    options = {
        "wrong image column": {"image_column": "img"},
        "wrong label column": {"label_column": "fine_label"},
        "class_names of wrong length": {"class_names": ["cat", "dog", "eel"]},
        "a column of text as images": {"image_column": "label"},
    }[case]
    return {"path": str(_saved(tmp_path)), **options}


BAD_INPUT = [
    ("missing path", FileNotFoundError, r"nowhere/animals' does not exist; give a save_to_disk folder"),
    ("no test split", ValueError, r"has no split 'test'; its splits are \['train', 'validation'\]: set test_split"),
    ("wrong image column", ValueError, r"has no column 'img'; its columns are \['image', 'label'\]: set image_"),
    ("wrong label column", ValueError, r"has no column 'fine_label'; .*: set label_column"),
    ("string labels", ValueError, r"column 'label' holds .*string.*, not class ids .*class_encode_column"),
    ("class_names of wrong length", ValueError, r"class_names has 3 names but 'label' has 4 classes"),
    ("a column of text as images", ValueError, r"column 'label' holds ClassLabel.*, not images"),
    ("hidden test labels", ValueError, r"split 'test': 1 rows have label -1 .*choose a labelled split"),
]


@pytest.mark.parametrize(
    ("case", "error", "message"), [pytest.param(*bad, id=bad[0].replace(" ", "_")) for bad in BAD_INPUT]
)
def test_bad_input_is_one_line_naming_the_fix(tmp_path: Path, case: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as raised:
        _stream(**_bad(tmp_path, case))
    assert "\n" not in str(raised.value)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Refuses and records every connection; the list must stay empty (HF falls back to its cache on any error,
    so a refused connection alone could go unnoticed)."""
    attempts: list[tuple[Any, ...]] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"tried the network: {attempts[:1]}"


def test_a_hub_name_not_in_the_cache_is_refused_without_the_network(tmp_path: Path, no_network: list[Any]) -> None:
    import datasets.config
    import huggingface_hub.constants

    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(FileNotFoundError, match=r"'cil-tests/no-such-set' is no local folder and not in the local "
                       r"Hugging Face cache \(.*\); set download: true") as raised:  # fmt: skip
        _stream("cil-tests/no-such-set", cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(raised.value)
    assert before == (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)  # switched back


def test_a_hub_name_in_the_cache_is_read_from_it_without_the_network(tmp_path: Path, no_network: list[Any]) -> None:
    from streams._sources import missing

    for split, data in _dataset_dict().items():
        data.to_parquet(str(tmp_path / "animals" / f"{split}-00000-of-00001.parquet"))
    cache = tmp_path / "cache"
    datasets.load_dataset(str(tmp_path / "animals"), cache_dir=str(cache))  # prepared as <cache>/animals/...
    (cache / "animals").rename(cache / "cil-tests___animals")  # where HF caches the hub dataset cil-tests/animals
    stream = _stream("cil-tests/animals", cache_dir=str(cache))
    assert stream.name == "animals" and [task.class_names for task in stream] == [("cat", "dog"), ("eel", "fox")]
    source = {"type": "hf_dataset", "path": "cil-tests/animals", "cache_dir": str(cache)}
    assert missing(source, tmp_path / "elsewhere") is None


def test_missing_datasets_package_is_one_line_with_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"^hf_dataset needs the Hugging Face datasets package: pip install"):
        _stream(tmp_path)


def test_sample_keys_name_rows_stably_and_the_feature_cache_reads_them(tmp_path: Path) -> None:
    from cil.feature_cache import sample_keys
    from cil.method import create_method
    from tests.conftest import run_engine, tiny_backbone

    path = _saved(tmp_path)
    first, again = _stream(path), _stream(path)
    train, same = first[0].train.dataset, again[0].train.dataset  # type: ignore[attr-defined]
    assert isinstance(train, HFImages)
    keys = train.sample_keys()
    assert keys is not None and keys == same.sample_keys() and len(set(keys)) == len(train) == 12
    task_rows = first[0].train.indices  # type: ignore[attr-defined]
    assert sample_keys(first[0].train) == [keys[i] for i in task_rows]  # a task takes its rows' keys
    runs = []
    for name, stream in (("a", first), ("b", _stream(path, order=[3, 2, 1, 0]))):
        torch.manual_seed(0)  # the same random tiny ViT
        method = create_method("simplecil", tiny_backbone())
        runs.append(run_engine(tmp_path / name, method, stream, feature_cache=tmp_path / "cache"))
    assert runs[0].features.store.misses == 4 * (3 + 2)  # every image once
    assert runs[1].features.store.misses == 0 and runs[1].features.store.hits == 4 * (3 + 2)


# ---- the NEVIS-style source ----------------------------------------------------------------------------------------
def _image_folder(root: Path, classes: tuple[str, ...], per_split: dict[str, int]) -> None:
    for c, name in enumerate(classes):
        for split, count in per_split.items():
            for i in range(count):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((6, 6), 10 * c + i + 100 * (split == "test"), np.uint8)).save(
                    root / split / name / f"{i}.png"
                )


def _mixed(root: Path, hf_task: dict[str, Any]) -> Stream:
    tasks = [{"dataset": "leaves", "year": 2012, "root": "leaves"}, {"dataset": "animals", "year": 2021, **hf_task}]
    return build_stream({"name": "dataset_stream", "root": str(root), "tasks": tasks})


@pytest.mark.parametrize(
    "hf_task",
    [
        {"source": {"type": "hf_dataset", "path": "animals"}},  # relative to the data root
        {"root": "animals", "source": {"type": "hf_dataset"}},  # the task's folder is the dataset
    ],
    ids=["path", "root"],
)
def test_a_dataset_stream_mixes_image_folder_and_hf_sources(tmp_path: Path, hf_task: dict[str, Any]) -> None:
    _image_folder(tmp_path / "leaves", ("elm", "oak"), {"train": 10, "test": 2})
    _saved(tmp_path)
    stream = _mixed(tmp_path, hf_task)
    assert [task.class_names for task in stream] == [("elm", "oak"), NAMES]
    assert [task.classes for task in stream] == [(0, 1), (2, 3, 4, 5)]
    assert [len(task.test) for task in stream] == [4, 8]  # the official test splits
    assert stream[1].metadata["source"] == "hf_dataset"
    assert _pixel_classes(stream[1].test) == {0, 1, 2, 3}


def test_missing_hf_sources_are_reported_with_the_others(tmp_path: Path, no_network: list[Any]) -> None:
    tasks = [
        {"dataset": "leaves", "year": 2012, "root": "leaves"},
        {"dataset": "hub", "year": 2020, "source": {"type": "hf_dataset", "path": "cil-tests/no-such-set"}},
        {"dataset": "folder", "year": 2021, "root": "animals", "source": {"type": "hf_dataset"}},
    ]
    with pytest.raises(FileNotFoundError) as raised:
        build_stream({"name": "dataset_stream", "root": str(tmp_path), "tasks": tasks})
    message = str(raised.value)
    assert "3 of 3 tasks have no data" in message
    assert "hub (2020): hf_dataset: 'cil-tests/no-such-set' is no local folder and not in the local" in message
    assert "animals' is missing or empty: put a save_to_disk folder or parquet files there" in message


def test_an_unknown_hf_source_key_is_refused(tmp_path: Path) -> None:
    _saved(tmp_path)
    with pytest.raises(KeyError, match=r"unknown key\(s\) \['label_colum'\]; valid keys: \['type', 'path'"):
        _mixed(tmp_path, {"source": {"type": "hf_dataset", "path": "animals", "label_colum": "y"}})


# ---- end to end ----------------------------------------------------------------------------------------------------
def test_cil_run_over_an_hf_stream(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    out = tmp_path / "run"
    stream = json.dumps({"name": "hf_dataset", "path": str(path), "increment": 2})
    config = str(ROOT / "configs/experiments/quickstart.yaml")
    code = main(["run", "--config", config, "--config", TINY, "--stream", stream, "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["finished_tasks"] == 2
    results = pd.read_csv(out / "results.csv")
    assert sorted(set(zip(results["train_task"], results["eval_task"], strict=True))) == [(0, 0), (1, 0), (1, 1)]
    assert results["n_test"].sum() == 3 * 4  # task 0 scored twice, task 1 once, 4 test images each
    assert "name: hf_dataset" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_the_readme_yaml_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's hf_dataset + tracker block, with only its dataset path and W&B folder pointed at this test's
    files: a 20-class dataset with the README's column names, B0-Inc10, a W&B run kept offline."""
    pytest.importorskip("wandb")
    import re

    import yaml

    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if "hf_dataset" in b]
    config = yaml.safe_load(block)
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=20)})

    def split(per_class: int) -> Any:
        pixels = [np.full((6, 6, 3), 12 * c + i, np.uint8) for c in range(20) for i in range(per_class)]
        labels = [c for c in range(20) for _ in range(per_class)]
        rows = {"img": [Image.fromarray(p) for p in pixels], "fine_label": labels}
        return datasets.Dataset.from_dict(rows, features=features)

    data = datasets.DatasetDict({"train": split(2), "test": split(1)})
    config["stream"]["path"] = str(_saved(tmp_path, data, "cifar100_hf"))
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "wandb")
    (tmp_path / "readme.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    quickstart = str(ROOT / "configs/experiments/quickstart.yaml")
    # the tiny overrides first: the README block's stream replaces their tiny one
    arguments = ["run", "--config", quickstart, "--config", TINY, "--config", str(tmp_path / "readme.yaml")]
    assert main([*arguments, "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] and summary["num_tasks"] == 2 and summary["stream"] == "cifar100_hf"
    assert len(list((tmp_path / "wandb").rglob("run-*.wandb"))) == 1
