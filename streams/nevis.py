"""NEVIS-style streams: a chronological sequence of datasets, each a task with its own classes.

Bornschein et al., "NEVIS'22: A Stream of 100 Tasks Sampled from 30 Years of Computer Vision Research" (JMLR 2023);
facts from ``google-deepmind/dm_nevis``. A stream is data: ``streams/specs/<name>.yaml`` lists the tasks in
publication order, each with its NEVIS name, year, kind (``multiclass`` / ``multilabel``), data folder and reader
(``source``, see :mod:`streams._sources`). The published variants ship as ``nevis_tiny``, ``nevis_short`` and
``nevis_full``; ``nevis_offline`` is a NEVIS-style stream over data the package registries hold.

Splits, as dm_nevis defines them (seeded by ``split_seed``, stratified by class for multi-class data):

* official train + test: the official train split is cut 70 / 15 / 15 into train / dev / dev_test;
* official train + validation + test: train is cut 80 / 20 into train / dev; dev_test is the validation split;
* no official split: one stratified cut of everything, 56 / 12 / 12 / 20 into train / dev / dev_test / test.

These are dm_nevis's rules for its TFDS datasets with a train / test split (and with a validation split). dm_nevis
departs from them for a few datasets (ImageNet 90 / 5 / 5; VOC 2012: val halved into dev_test and test), and its
own datasets carry per-dataset splits (COIL-100 by view angle, ...); here the uniform rules apply to all of them,
so per-task numbers on those datasets are not comparable with NEVIS's to the decimal.

``mode: test`` (NEVIS's test stream) trains on train + dev and scores on test; ``mode: dev`` trains on train,
exposes dev as the task's ``val`` split and scores on dev_test, and stops before ``dev_stop_year`` (2020 for the
published streams, as dm_nevis's DEFAULT_NEVIS_STOP_YEAR), so hyper-parameters are never chosen on test data.

Missing data is reported for all tasks at once, before anything is read, with what to put where; ``skip_missing``
runs the tasks that are present instead and records the skipped ones in the stream's metadata (``stream.json``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch.utils.data import Dataset, Subset

from cil.stream import Stream, register_stream
from cil.task import TASK_KINDS, LabelMapped, Task
from streams._sources import SourceData, missing, read_source

__all__ = ["SPEC_DIR", "TaskSpec", "build_task_stream", "read_spec"]

log = logging.getLogger(__name__)

SPEC_DIR = Path(__file__).parent / "specs"
MODES = ("test", "dev")


@dataclass(frozen=True)
class TaskSpec:
    """One task of a stream spec: which dataset, from which year, read how."""

    dataset: str
    year: int | None
    source: dict[str, Any] = field(default_factory=lambda: {"type": "image_folder"})
    root: str | None = None
    kind: str = "multiclass"
    optional: bool = False  # skipped (and recorded) when its data is missing, without skip_missing
    prompt: str | None = None  # the template a CLIP class-name head fills with this task's class names ("{}")

    @classmethod
    def parse(cls, entry: dict[str, Any], where: str) -> TaskSpec:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(entry) - known)
        if unknown:
            raise KeyError(f"{where}: unknown task key(s) {unknown}; valid keys: {sorted(known)}")
        if "dataset" not in entry:
            raise KeyError(f"{where}: every task needs a 'dataset' name, got {entry}")
        year = None if entry.get("year") is None else int(entry["year"])
        spec = cls(**{**entry, "year": year, "dataset": str(entry["dataset"])})
        if spec.kind not in TASK_KINDS:
            raise ValueError(f"{where}: kind must be one of {TASK_KINDS}, got {spec.kind!r}")
        if spec.prompt is not None and str(spec.prompt).count("{}") != 1:
            raise ValueError(f"{where}: prompt must hold one {{}} for the class name, got {spec.prompt!r}")
        named = spec.source.get("type") == "hf_dataset" and spec.source.get("path") is not None
        if spec.source.get("type") != "offline" and spec.root is None and not named:
            raise KeyError(f"{where}: task {spec.dataset!r} needs a 'root' (its folder under the data root)")
        return spec


def read_spec(spec: str | Path) -> tuple[str, int | None, list[TaskSpec]]:
    """``(name, dev_stop_year, tasks)`` of a spec file, given as a path or as the name of a shipped spec."""
    path = Path(spec)
    if not path.suffix:
        path = SPEC_DIR / f"{spec}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no stream spec {str(spec)!r}; shipped specs: {shipped}, or give a path to a .yaml")
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("tasks") or []
    tasks = [TaskSpec.parse(entry, f"{path.name} task {i}") for i, entry in enumerate(entries)]
    return str(data.get("name", path.stem)), data.get("dev_stop_year"), tasks


def build_task_stream(
    name: str,
    specs: list[TaskSpec],
    *,
    root: str | Path = ".",
    mode: str = "test",
    stop_year: int | None = None,
    dev_stop_year: int | None = None,
    skip_missing: bool = False,
    split_seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    download: bool = False,
) -> Stream:
    """Builds the tasks of ``specs`` that fall before ``stop_year`` (exclusive; in dev mode ``dev_stop_year``
    when ``stop_year`` is not given), in order, with global class ids numbered along the stream. See the module
    docstring for splits, modes and missing data."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "dev" and stop_year is None:
        stop_year = dev_stop_year
    data_root = Path(root).expanduser()
    if stop_year is not None and any(spec.year is None for spec in specs):
        raise ValueError(f"stream {name!r}: stop_year needs a year on every task")
    wanted = [spec for spec in specs if stop_year is None or spec.year < stop_year]  # type: ignore[operator]
    absent: list[tuple[TaskSpec, str]] = []
    for spec in wanted:
        problem = missing(spec.source, _task_path(spec, data_root), download)
        if problem is not None:
            absent.append((spec, problem))
    required = [(spec, problem) for spec, problem in absent if not spec.optional]
    if required and not skip_missing:
        lines = "\n".join(f"  - {spec.dataset} ({spec.year}): {problem}" for spec, problem in required)
        raise FileNotFoundError(
            f"stream {name!r}: {len(required)} of {len(wanted)} tasks have no data under {str(data_root)!r}:\n{lines}\n"
            "Put the data there, or set skip_missing: true to run only the tasks that are present."
        )
    for spec, problem in absent:
        log.warning("stream %s: skipping %s (%s): %s", name, spec.dataset, spec.year, problem)
    skipped = {id(spec) for spec, _ in absent}
    tasks: list[Task] = []
    names: set[str] = set()
    dropped: dict[str, int] = {}
    for spec in wanted:
        if id(spec) in skipped:
            continue
        source = read_source(spec.source, _task_path(spec, data_root), download=download)
        task_name = _unique(_slug(spec.dataset) + (f"_{spec.year}" if spec.year is not None else ""), names)
        task, n_dropped = _make_task(spec, source, len(tasks), task_name, sum(t.num_classes for t in tasks), mode,
                                     split_seed, train_per_class, test_per_class)  # fmt: skip
        if n_dropped:
            dropped[task_name] = n_dropped
        tasks.append(task)
    if not tasks:
        raise FileNotFoundError(f"stream {name!r}: no task has data (skipped all {len(wanted)})")
    metadata = {
        "root": str(data_root),
        "mode": mode,
        "stop_year": stop_year,
        "split_seed": split_seed,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "skipped_tasks": [{"dataset": s.dataset, "year": s.year, "reason": p} for s, p in absent],
        "dropped_test_images": dropped,
    }
    return Stream(name=name, tasks=tuple(tasks), metadata=metadata)


def _task_path(spec: TaskSpec, data_root: Path) -> Path | None:
    """The task's folder, ``<data root>/<root>``; the data root for an HF source named by ``source.path`` alone (a
    hub name, or a path relative to the data root); None for an offline source."""
    if spec.root is not None:
        return data_root / spec.root
    return data_root if spec.source.get("type") == "hf_dataset" else None


# ---- one task ------------------------------------------------------------------------------------------------------
def _make_task(
    spec: TaskSpec,
    source: SourceData,
    index: int,
    name: str,
    first_id: int,
    mode: str,
    split_seed: int,
    train_per_class: int | None,
    test_per_class: int | None,
) -> tuple[Task, int]:
    multilabel = spec.kind == "multilabel"
    if multilabel != (source.labels["train"].ndim == 2):
        raise ValueError(f"{spec.dataset}: the spec says kind {spec.kind!r} but its reader yields the other kind")
    splits = _nevis_splits(source, split_seed)
    if mode == "test":
        (train_data, train_idx), (eval_data, eval_idx) = _union(splits["train"], splits["dev"]), splits["test"]
        val = None
    else:
        (train_data, train_idx), (eval_data, eval_idx) = splits["train"], splits["dev_test"]
        val = splits["dev"]
    train_labels, eval_labels = _labels_of(source, train_data)[train_idx], _labels_of(source, eval_data)[eval_idx]
    train_idx = train_idx[_cap(train_labels, train_per_class, split_seed)]
    eval_keep = _cap(eval_labels, test_per_class, split_seed + 1)
    eval_idx, eval_labels = eval_idx[eval_keep], eval_labels[eval_keep]
    metadata = {"dataset": spec.dataset, "year": spec.year, "source": spec.source.get("type"), "mode": mode}
    if spec.prompt is not None:  # only when given: the stream's fingerprint of earlier runs stays the same
        metadata["prompt"] = spec.prompt
    if source.content is not None:  # only where known (HF): likewise
        metadata["content"] = source.content
    if multilabel:
        classes = tuple(range(first_id, first_id + len(source.class_names)))
        task = Task(
            index=index,
            name=name,
            classes=classes,
            class_names=tuple(source.class_names),
            train=Subset(train_data, train_idx.tolist()),
            test=Subset(eval_data, eval_idx.tolist()),
            val=Subset(val[0], val[1].tolist()) if val is not None else None,
            metadata=metadata,
            kind="multilabel",
        )
        return task, 0
    present = np.unique(_labels_of(source, train_data)[train_idx])
    label_map = {int(original): first_id + rank for rank, original in enumerate(present)}
    known = np.isin(eval_labels, present)  # test images of classes without a training image cannot be learned
    if not known.all():
        log.warning("%s: dropping %d test images of classes with no training image", name, int((~known).sum()))
    task = Task(
        index=index,
        name=name,
        classes=tuple(label_map.values()),
        class_names=tuple(_class_name(source, int(c)) for c in present),
        train=LabelMapped(train_data, train_idx.tolist(), label_map),
        test=LabelMapped(eval_data, eval_idx[known].tolist(), label_map),
        val=_known_only(val, source, label_map),
        metadata={**metadata, "original_classes": tuple(int(c) for c in present)},
    )
    return task, int((~known).sum())


Split = tuple[Dataset[Any], np.ndarray]  # (dataset, indices into it)


def _nevis_splits(source: SourceData, seed: int) -> dict[str, Split]:
    """train / dev / dev_test / test as (dataset, indices), by the rules in the module docstring."""
    train, labels = source.train, source.labels["train"]
    if source.test is not None and source.val is not None:
        fit, dev = _partition(labels, (0.8, 0.2), seed)
        return {
            "train": (train, fit),
            "dev": (train, dev),
            "dev_test": (source.val, np.arange(len(source.labels["val"]))),
            "test": (source.test, np.arange(len(source.labels["test"]))),
        }
    if source.test is not None:
        fit, dev, dev_test = _partition(labels, (0.7, 0.15, 0.15), seed)
        test: Split = (source.test, np.arange(len(source.labels["test"])))
        return {"train": (train, fit), "dev": (train, dev), "dev_test": (train, dev_test), "test": test}
    fit, dev, dev_test, held_out = _partition(labels, (0.56, 0.12, 0.12, 0.2), seed)
    return {"train": (train, fit), "dev": (train, dev), "dev_test": (train, dev_test), "test": (train, held_out)}


def _partition(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Cuts the indices into len(fractions) parts, per class (multi-class) or over all (multi-label), seeded."""
    rng = np.random.RandomState(seed)
    groups = [np.arange(len(labels))] if labels.ndim == 2 else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    bounds = np.cumsum(fractions)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for members in groups:
        members = rng.permutation(members)
        cuts = np.round(bounds * len(members)).astype(int)
        for part, (start, stop) in enumerate(zip(np.r_[0, cuts[:-1]], cuts, strict=True)):
            parts[part].append(members[start:stop])
    return [np.sort(np.concatenate(p)) for p in parts]


def _cap(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Positions to keep: at most ``per_class`` per class (multi-label: ``per_class x K`` in all), seeded."""
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.RandomState(seed)
    if labels.ndim == 2:
        return np.sort(rng.permutation(len(labels))[: per_class * labels.shape[1]])
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def _union(a: Split, b: Split) -> Split:
    assert a[0] is b[0], "train and dev come from the same dataset"
    return a[0], np.sort(np.concatenate([a[1], b[1]]))


def _labels_of(source: SourceData, dataset: Dataset[Any]) -> np.ndarray:
    for split in ("train", "val", "test"):
        if getattr(source, split) is dataset:
            return source.labels[split]
    raise AssertionError("a split of another dataset")


def _known_only(split: Split | None, source: SourceData, label_map: dict[int, int]) -> Dataset[Any] | None:
    if split is None:
        return None
    data, indices = split
    labels = _labels_of(source, data)[indices]
    return LabelMapped(data, indices[np.isin(labels, list(label_map))].tolist(), label_map)


def _class_name(source: SourceData, label: int) -> str:
    return source.class_names[label] if label < len(source.class_names) else str(label)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    taken.add(candidate)
    return candidate


# ---- registered streams --------------------------------------------------------------------------------------------
@register_stream("nevis")
def nevis(
    variant: str = "tiny",
    root: str = "data/nevis",
    mode: str = "test",
    stop_year: int | None = None,
    skip_missing: bool = False,
    split_seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    download: bool = False,
) -> Stream:
    """A published NEVIS stream (``tiny``, ``short``, ``full``) or any spec file, over the datasets under ``root``.

    Args:
        variant: ``tiny`` / ``short`` / ``full`` / ``offline`` (``streams/specs/nevis_<variant>.yaml``) or a path.
        root: Data root; each task reads ``root/<task root>``.
        mode: ``test`` (train on train + dev, score on test) or ``dev`` (train on train, score on dev_test, stop at
            the spec's ``dev_stop_year``).
        stop_year: Drop tasks from this year on (default: none in test mode, the spec's dev_stop_year in dev mode).
        skip_missing: Run the tasks whose data is present instead of failing; the skipped ones are recorded.
        split_seed: Seed of the splits NEVIS makes (not of the run).
        train_per_class: Cap on training images per class (per task), for quick runs.
        test_per_class: Cap on test images per class (per task).
        download: Let torchvision download the datasets it can (needs internet).
    """
    spec = variant if Path(variant).suffix else f"nevis_{variant}"
    name, dev_stop_year, specs = read_spec(spec)
    stream = build_task_stream(
        name,
        specs,
        root=root,
        mode=mode,
        stop_year=stop_year,
        dev_stop_year=dev_stop_year,
        skip_missing=skip_missing,
        split_seed=split_seed,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        download=download,
    )
    stream.metadata["variant"] = variant
    return stream


@register_stream("nevis_offline")
def nevis_offline(
    mode: str = "test",
    stop_year: int | None = None,
    split_seed: int = 0,
    train_per_class: int | None = 60,
    test_per_class: int | None = 30,
) -> Stream:
    """A NEVIS-style stream over data the package registries ship (``streams/specs/nevis_offline.yaml``): UCI
    digits (1998), MNIST (1998), font glyphs (2004), Fashion-MNIST (2017, skipped if apt's package is absent),
    Animal-MNIST (2021). The per-class caps keep a CPU run to minutes.

    Args:
        mode: ``test`` (train on train + dev, score on test) or ``dev`` (train on train, score on dev_test, stop at
            the spec's ``dev_stop_year``).
        stop_year: Drop tasks from this year on.
        split_seed: Seed of the splits NEVIS makes (not of the run).
        train_per_class: Cap on training images per class (per task).
        test_per_class: Cap on test images per class (per task).
    """
    return nevis(
        variant="offline",
        mode=mode,
        stop_year=stop_year,
        split_seed=split_seed,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
    )


@register_stream("dataset_stream")
def dataset_stream(
    tasks: list[dict[str, Any]],
    root: str = ".",
    stream_name: str = "dataset_stream",
    keep_order: bool = False,
    mode: str = "test",
    dev_stop_year: int | None = None,
    stop_year: int | None = None,
    skip_missing: bool = False,
    split_seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> Stream:
    """Your own NEVIS-style stream, written in the config: a list of ``{dataset, year, root}`` (ImageFolder roots by
    default; any ``source`` of a spec works), ordered by year (stable for equal years), or as listed with
    ``keep_order: true`` (then years are optional). ``stream_name`` names the stream in the results.

    Example::

        stream:
          name: dataset_stream
          root: /data/my_stream
          tasks:
            - {dataset: leaves, year: 2012, root: leaves}      # leaves/<class>/*.jpg (split by the NEVIS rule)
            - {dataset: insects, year: 2019, root: insects}    # insects/{train,test}/<class>/*.jpg
            - {dataset: birds, year: 2021, root: birds_hf, source: {type: hf_dataset}}  # a save_to_disk folder
            - dataset: food
              year: 2022
              source: {type: hf_dataset, path: ethz/food101, test_split: validation}  # a hub name, if cached

    An ``hf_dataset`` source (:mod:`streams.hf`) reads ``<root>/<root of the task>`` or, with ``source.path``, that
    path relative to it (the data root when the task has no ``root``), else that hub name from the HF cache.
    """
    specs = [TaskSpec.parse(dict(t), f"stream.tasks[{i}]") for i, t in enumerate(tasks)]
    if not keep_order:
        undated = [spec.dataset for spec in specs if spec.year is None]
        if undated:
            raise ValueError(f"tasks {undated} have no year: give every task one, or set keep_order: true")
        specs.sort(key=lambda spec: spec.year)  # type: ignore[arg-type, return-value]
    return build_task_stream(
        stream_name,
        specs,
        root=root,
        mode=mode,
        stop_year=stop_year,
        dev_stop_year=dev_stop_year,
        skip_missing=skip_missing,
        split_seed=split_seed,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
    )
