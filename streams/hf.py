"""Hugging Face ``datasets`` as a class-incremental stream (``hf_dataset``) and as a NEVIS-style source.

Many datasets live as HF datasets: on the hub, in a ``save_to_disk`` folder or in parquet files. :func:`read_hf`
loads one, checks its splits and columns up front (one-line errors naming what to change) and wraps each split in
:class:`HFImages`, which decodes one image per ``__getitem__``; labels are read once, from the label column alone.
The ``hf_dataset`` stream and the ``hf_dataset`` source of :mod:`streams._sources` both go through it.

Nothing is downloaded unless asked: a hub name is read from the local HF cache with the hub switched off (HF's
offline mode) unless ``download: true``.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from cil.data import _rgb, stratified_split
from cil.stream import Stream, register_stream
from cil.task import class_incremental_split

__all__ = ["INSTALL", "HFImages", "absent", "hf_dataset", "locate", "read_hf"]

INSTALL = "pip install 'datasets>=4.0'"
# hub ids are "name" or "namespace/name"; anything else that is not on disk is a mistyped path
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


class HFImages(Dataset[tuple[Any, int]]):
    """Rows ``rows`` of one split of an HF dataset as ``(image, label)``: an RGB PIL image (``Image`` feature) or a
    ``uint8`` array ``[H, W]`` / ``[H, W, C]`` (array columns), as :class:`cil.data.ImageFolderDataset` and
    :class:`cil.data.ArrayDataset` hand them out. Decodes one image per item; ``targets`` is stored, so splitting
    by class never decodes an image (:func:`cil.task.stored_targets`)."""

    def __init__(self, split: Any, image_column: str, targets: np.ndarray) -> None:
        chosen = split.select_columns([image_column])  # a row read decodes the image column only
        # HF's id of this column's content and history (taken after the selection: another column has another id)
        self.fingerprint = str(getattr(chosen, "_fingerprint", ""))
        is_image = isinstance(split.features[image_column], _datasets().Image)
        self.split = chosen if is_image else chosen.with_format("numpy")  # arrays as arrays, not nested lists
        self.image_column = image_column
        self.rows = np.arange(len(split))  # [N] rows of the split
        self.targets = np.asarray(targets, dtype=np.int64)  # [N]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        row = int(self.rows[i])
        value = self.split[row][self.image_column]
        return _image(value, self.image_column, row), int(self.targets[i])

    def subset(self, rows: np.ndarray) -> HFImages:
        """The items at positions ``rows`` (e.g. a per-class cap), still reading the same split."""
        chosen = copy.copy(self)
        chosen.rows, chosen.targets = self.rows[rows], self.targets[rows]
        return chosen

    def sample_keys(self) -> list[bytes] | None:
        """A 32-byte identity per item from the split's fingerprint and row, without decoding: the keys of
        :mod:`cil.feature_cache` for HF data. None (not cached) where the split has no fingerprint."""
        if not self.fingerprint:
            return None
        return [hashlib.sha256(f"hf {self.fingerprint}\n{row}".encode()).digest() for row in self.rows.tolist()]


def _image(value: Any, column: str, row: int) -> Any:
    if isinstance(value, Image.Image):
        return _rgb(value)
    array = np.asarray(value)
    channels_last = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4))
    if not channels_last or array.dtype.kind not in "ui":
        raise ValueError(
            f"hf_dataset column {column!r} row {row} holds a {array.dtype} array of shape {array.shape}, not an "
            "image; store images as an Image feature or uint8 arrays [H, W] / [H, W, C] with C 1, 3 or 4"
        )
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"hf_dataset column {column!r} row {row} holds values outside 0..255; store uint8 pixels")
        array = array.astype(np.uint8)
    return array


# ---- loading -------------------------------------------------------------------------------------------------------
def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"hf_dataset needs the Hugging Face datasets package: {INSTALL}") from None
    return datasets


@contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """HF's offline mode for one call. ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` are read when the packages are
    imported, so the switch is the two module constants that ``datasets`` and ``huggingface_hub`` consult at call
    time; with it on, a hub name resolves only from the local cache."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def locate(path: str, base: Path | None = None) -> tuple[str, str]:
    """How ``path`` names a dataset: ``("disk", folder)`` (``save_to_disk``), ``("folder", folder)`` (data files,
    e.g. parquet, splits inferred from the file names), ``("files", pattern)`` (a glob; ``{split}`` in it stands for
    the split name) or ``("hub", name)``. Relative paths are resolved against ``base`` (default: the working
    directory); a relative path that does not exist and looks like ``namespace/name`` is a hub name."""
    if not isinstance(path, str):
        raise ValueError(f"hf_dataset: path must be a folder, a glob or a hub name (text), got {path!r}")
    local = Path(path).expanduser()
    if base is not None and not local.is_absolute():
        local = base / local
    if ("{split}" in path or glob.has_magic(path)) and not local.exists():  # a real folder named `a[1]` is a folder
        return "files", str(local)
    if local.is_dir():
        saved = (local / "dataset_dict.json").is_file() or (local / "state.json").is_file()
        return ("disk" if saved else "folder"), str(local)
    if local.exists():
        return "files", str(local)
    if _HUB_NAME.match(path) and not path.startswith("."):
        return "hub", path
    raise FileNotFoundError(
        f"hf_dataset: {str(local)!r} does not exist; give a save_to_disk folder, a folder or glob of parquet files, "
        "or a hub name (namespace/name)"
    )


def absent(kind: str, where: str) -> str | None:
    """What is missing at a local ``where`` of :func:`locate`'s ``kind`` (files a glob does not match, an empty
    folder), or None."""
    if kind == "files" and not glob.glob(where.replace("{split}", "*")):
        return f"hf_dataset: no file matches {where!r}"
    if kind in ("disk", "folder") and not any(Path(where).iterdir()):
        return f"{where!r} is empty: put a save_to_disk folder or parquet files there"
    return None


def _load(kind: str, where: str, revision: str | None, cache_dir: str | None, download: bool) -> dict[str, Any]:
    """The splits of the dataset at ``where`` (see :func:`locate`), by name."""
    datasets = _datasets()
    if (problem := absent(kind, where)) is not None:
        raise FileNotFoundError(problem)
    if kind == "disk":
        loaded = datasets.load_from_disk(where)
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if kind == "files":
        builder = "arrow" if where.endswith(".arrow") else "parquet"
        patterns = {"train": where}
        if "{split}" in where:
            names = {m.group(1) for f in glob.glob(where.replace("{split}", "*")) if (m := _split_of(where, f))}
            patterns = {name: where.replace("{split}", name) for name in sorted(names)}
        if not patterns:  # files, but none with a split name where {split} stands
            raise FileNotFoundError(f"hf_dataset: no file matches {where!r}")
        with _hub_offline(True):
            return dict(datasets.load_dataset(builder, data_files=patterns, cache_dir=cache_dir))
    if kind == "folder":
        with _hub_offline(True):  # local files never need the hub
            return dict(datasets.load_dataset(where, cache_dir=cache_dir))
    try:
        with _hub_offline(not download):
            return dict(datasets.load_dataset(where, revision=revision, cache_dir=cache_dir))
    except (ConnectionError, FileNotFoundError) as error:
        cache = cache_dir or datasets.config.HF_DATASETS_CACHE
        if download:
            first = (str(error).splitlines() or [type(error).__name__])[0]
            raise FileNotFoundError(f"hf_dataset: cannot load {where!r} from the hub ({first})") from None
        raise FileNotFoundError(
            f"hf_dataset: {where!r} is no local folder and not in the local Hugging Face cache ({cache}); set "
            "download: true to fetch it from the hub (needs internet), or point path at a save_to_disk folder"
        ) from None


def _split_of(pattern: str, file: str) -> re.Match[str] | None:
    prefix, _, suffix = pattern.partition("{split}")
    # HF's split names are words (`\w+`): `{split}*.parquet` reads `train` from `train-00000.parquet`
    regex = re.escape(prefix).replace(r"\*", ".*") + r"(\w+)" + re.escape(suffix).replace(r"\*", ".*")
    return re.fullmatch(regex, file)


def read_hf(
    path: str,
    *,
    splits: dict[str, str],
    image_column: str = "image",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    download: bool = False,
    base: Path | None = None,
) -> tuple[dict[str, HFImages], list[str]]:
    """Loads the dataset ``path`` names (see :func:`locate`) and checks it before any image is decoded.

    Args:
        path: A ``save_to_disk`` folder, a folder or glob of parquet files, or a hub name.
        splits: Our split name (``train``, ``test``, ``val``) -> the dataset's split name.
        image_column: Column of images (``Image`` feature, or uint8 arrays ``[H, W]`` / ``[H, W, C]``).
        label_column: Column of class ids (``ClassLabel`` or integers).
        class_names: One name per class id (default: the ``ClassLabel`` names, else the ids as strings).
        revision: Hub revision (branch, tag or commit).
        cache_dir: HF cache folder (default: HF's, ``~/.cache/huggingface/datasets``).
        download: Let ``datasets`` fetch a hub name that is not cached (needs internet).
        base: Folder that relative paths are resolved against (the data root of a NEVIS-style stream).

    Returns:
        ``({our split name: HFImages}, class names)``.
    """
    datasets = _datasets()
    kind, where = locate(path, base)
    loaded = _load(kind, where, revision, cache_dir, download)
    absent = [name for name in splits.values() if name not in loaded]
    if absent:
        keys = ", ".join(f"{ours}_split" for ours, theirs in splits.items() if theirs in absent)
        raise ValueError(
            f"hf_dataset {path!r} has no split {absent[0]!r}; its splits are {sorted(loaded)}: set {keys} to one of "
            "them" + (" (put {split} in a glob to read one file set per split)" if kind == "files" else "")
        )
    chosen = {ours: loaded[theirs] for ours, theirs in splits.items()}
    names: list[str] | None = None
    for ours, split in chosen.items():
        features = split.features
        for column, role in ((image_column, "image_column"), (label_column, "label_column")):
            if column not in features:
                raise ValueError(
                    f"hf_dataset {path!r} split {splits[ours]!r} has no column {column!r}; its columns are "
                    f"{sorted(features)}: set {role}"
                )
        image = features[image_column]
        if not isinstance(image, (datasets.Image, datasets.List, datasets.LargeList, datasets.Array2D,
                                  datasets.Array3D)):  # fmt: skip
            raise ValueError(
                f"hf_dataset {path!r}: column {image_column!r} holds {image}, not images (an Image feature or uint8 "
                "arrays); set image_column"
            )
        label = features[label_column]
        if isinstance(label, datasets.ClassLabel):
            if names is not None and names != list(label.names):
                raise ValueError(f"hf_dataset {path!r}: the splits' {label_column!r} columns name other classes")
            names = list(label.names)
        elif not (isinstance(label, datasets.Value) and label.dtype in _INT_DTYPES):
            raise ValueError(
                f"hf_dataset {path!r}: column {label_column!r} holds {label}, not class ids (ClassLabel or integers); "
                f"encode it first (Dataset.class_encode_column({label_column!r})) or set label_column"
            )
    labels = {ours: _labels(split, label_column, path, splits[ours]) for ours, split in chosen.items()}
    top = max(int(y.max()) + 1 if len(y) else 0 for y in labels.values())  # classes the ids reach
    count = len(names) if names is not None else top
    if top > count:
        raise ValueError(f"hf_dataset {path!r}: label ids reach {top - 1} but {label_column!r} names {count} classes")
    if class_names is not None:
        if len(class_names) != count:
            source = "its ClassLabel" if names is not None else f"ids 0..{count - 1}"
            raise ValueError(
                f"hf_dataset {path!r}: class_names has {len(class_names)} names but {label_column!r} has {count} "
                f"classes ({source}); give one name per class id"
            )
        names = [str(n) for n in class_names]
    images = {ours: HFImages(split, image_column, labels[ours]) for ours, split in chosen.items()}
    return images, names if names is not None else [str(c) for c in range(count)]


def _labels(split: Any, column: str, path: str, name: str) -> np.ndarray:
    """The label column alone as int64 ``[N]``: arrow's view of it costs no decoding (``ds[column]`` in
    ``datasets`` 5 is a lazy column that converts row by row, seconds per 100k rows)."""
    values = split.with_format("arrow")[column]
    if values.null_count:
        raise ValueError(f"hf_dataset {path!r} split {name!r}: {values.null_count} rows have no {column!r}")
    labels = np.asarray(values.to_numpy(), dtype=np.int64)
    if len(labels) and labels.min() < 0:
        raise ValueError(
            f"hf_dataset {path!r} split {name!r}: {int((labels < 0).sum())} rows have label {int(labels.min())} "
            "(no label, as hidden test labels are stored); choose a labelled split"
        )
    return labels


# ---- the stream ----------------------------------------------------------------------------------------------------
@register_stream("hf_dataset")
def hf_dataset(
    path: str,
    train_split: str = "train",
    test_split: str | None = "test",
    image_column: str = "image",
    label_column: str = "label",
    class_names: list[str] | None = None,
    base: int = 0,
    increment: int = 10,
    seed: int | None = None,
    order: list[int] | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    split_seed: int = 0,
    test_fraction: float = 0.2,
    dataset_name: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    download: bool = False,
) -> Stream:
    """A Hugging Face dataset's train and test splits split by class into ``B{base}-Inc{increment}`` tasks.

    Example (a 10-task CIFAR-100 from a ``save_to_disk`` folder)::

        stream:
          name: hf_dataset
          path: /data/cifar100_hf            # save_to_disk folder, parquet folder / glob, or hub name
          label_column: fine_label           # a ClassLabel column: its names become the class names
          image_column: img
          increment: 10

    Args:
        path: A ``save_to_disk`` folder (a ``DatasetDict``), a folder of data files (``train-*.parquet``,
            ``test-*.parquet``, ...), a glob of parquet files (``{split}`` stands for the split name:
            ``data/{split}-*.parquet``), or a hub name (``namespace/name``), read from the local HF cache.
        train_split: Split to train on.
        test_split: Split to score on; null for a dataset with one split, of which ``test_fraction`` of every
            class is held out for testing (seeded by ``split_seed``).
        image_column: Column of images (``Image`` feature, or uint8 arrays ``[H, W]`` / ``[H, W, C]``).
        label_column: Column of class ids (``ClassLabel``, or integers).
        class_names: One name per class id (default: the ``ClassLabel`` names, else the ids).
        base: Classes in the first task (0: ``increment``).
        increment: Classes per later task.
        seed: Class-order seed (default: the run's seed).
        order: Explicit class order (a permutation of the class ids).
        train_per_class: Cap on training images per class (seeded), for quick runs.
        test_per_class: Cap on test images per class.
        split_seed: Seed of the caps and of a held-out test split (not of the run), so every run of the stream sees
            the same images.
        test_fraction: Share of each class held out for testing when ``test_split`` is null.
        dataset_name: Names the stream and its tasks (default: the last part of ``path``).
        revision: Hub revision (branch, tag or commit) of a hub name.
        cache_dir: HF cache folder (default: HF's).
        download: Let ``datasets`` fetch a hub name that is not in the cache (needs internet).
    """
    from streams.nevis import _cap  # the per-class cap NEVIS-style streams use

    splits, names = read_hf(
        path,
        splits={"train": train_split} if test_split is None else {"train": train_split, "test": test_split},
        image_column=image_column,
        label_column=label_column,
        class_names=class_names,
        revision=revision,
        cache_dir=cache_dir,
        download=download,
    )
    if test_split is None:  # one split: hold out a seeded share of every class
        rows = stratified_split(splits["train"].targets, test_fraction, split_seed, train_per_class, test_per_class)
        train, test = splits["train"].subset(rows[0]), splits["train"].subset(rows[1])
    else:
        train = splits["train"].subset(_cap(splits["train"].targets, train_per_class, split_seed))
        test = splits["test"].subset(_cap(splits["test"].targets, test_per_class, split_seed + 1))
    name = dataset_name or Path(re.split(r"[*?\[{]", path)[0]).name or "hf_dataset"  # a glob: its folder
    tasks = class_incremental_split(
        train,
        test,
        base=base,
        increment=increment,
        seed=seed,
        order=order,
        class_names=names,
        name=name,
    )  # labels from the datasets' stored targets: no image is decoded
    metadata = {"path": path, "train_split": train_split, "test_split": test_split, "image_column": image_column,
                "label_column": label_column, "revision": revision, "base": base, "increment": increment,
                "train_per_class": train_per_class, "test_per_class": test_per_class, "split_seed": split_seed,
                **({"test_fraction": test_fraction} if test_split is None else {}),
                # HF's content ids: a dataset rewritten at the same path is another stream (a resume refuses it)
                "content": {name: data.fingerprint for name, data in splits.items()}}  # fmt: skip
    return Stream(name=name, tasks=tuple(tasks), metadata=metadata)
