"""Datasets, transforms and loaders shared by all streams.

Streams hand out raw images (PIL images, ``uint8`` arrays of any size and channel count); the engine applies the
backbone's transform, so mixed resolutions and grey/colour tasks need no special casing in the streams.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "ArrayDataset",
    "DataConfig",
    "ImageFolderDataset",
    "Transformed",
    "build_transform",
    "find_duplicates",
    "image_folder",
    "make_loader",
    "stratified_split",
    "torchvision_dataset",
    "warn_duplicates",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
MAX_PIXELS_ENV = "CIL_MAX_IMAGE_PIXELS"


@dataclass
class DataConfig:
    """How the engine feeds images to a method.

    Args:
        batch_size: Training batch size.
        eval_batch_size: Batch size for feature extraction and evaluation (no gradients, so larger).
        num_workers: DataLoader worker processes. 0 is fastest on 2 CPU cores with in-memory data (measured:
            65 img/s with 0 workers vs 17.5 img/s with 2); raise it for JPEG folders on a many-core machine. Not
            chosen per device: training augmentations are drawn in the workers, from their own seeds, so the
            number of workers changes a run's results.
        augment: Random resized crop and horizontal flip for training batches; evaluation never augments.
    """

    batch_size: int = 32
    eval_batch_size: int = 128
    num_workers: int = 0
    augment: bool = True


class ArrayDataset(Dataset[tuple[np.ndarray, int]]):
    """In-memory images ``[N, H, W]`` or ``[N, H, W, C]`` (``uint8``) with integer labels."""

    def __init__(self, images: np.ndarray, targets: Sequence[int] | np.ndarray) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.targets[i])


class Transformed(Dataset[tuple[Any, ...]]):
    """Applies an image transform to the image of ``(image, label, *extra)`` samples; the rest passes through."""

    def __init__(self, dataset: Dataset[Any], transform: Callable[[Any], torch.Tensor]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        image, *rest = self.dataset[i]
        return (self.transform(image), *rest)


def _to_float_rgb(image: Any) -> torch.Tensor:
    """PIL image / ``uint8`` array / tensor -> float ``[3, H, W]`` in [0, 1]; grey images are repeated."""
    if isinstance(image, Image.Image):
        image = np.asarray(_rgb(image))
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(image))
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # [C, H, W]
    else:
        tensor = image if image.ndim == 3 else image[None]
    tensor = tensor.float().div(255.0) if tensor.dtype == torch.uint8 else tensor.float()
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    elif tensor.shape[0] == 4:  # RGBA
        tensor = tensor[:3]
    return tensor


def build_transform(
    input_size: int, mean: Sequence[float], std: Sequence[float], train: bool
) -> Callable[[Any], torch.Tensor]:
    """The backbone's preprocessing: to RGB float, resize to ``input_size`` (train: random resized crop + flip)."""
    from torchvision.transforms import v2

    size = (input_size, input_size)
    geometry: list[Any] = (
        [v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        if train
        else [v2.Resize(size, antialias=True)]
    )
    return v2.Compose([v2.Lambda(_to_float_rgb), *geometry, v2.Normalize(mean=list(mean), std=list(std))])


def make_loader(
    dataset: Dataset[Any], batch_size: int, shuffle: bool, num_workers: int, pin_memory: bool = False
) -> DataLoader[Any]:
    """``pin_memory``: batches in page-locked memory, so that the copy to a GPU runs asynchronously (Lightning
    copies with ``non_blocking=True`` to CUDA devices); the engine pins when its trainer runs on a GPU."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=False,
        pin_memory=pin_memory,
    )


def _checked_root(root: str | os.PathLike[str], what: str, fix: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what}: data root {str(path)!r} does not exist. {fix}")
    return path


def _rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image. 16-bit grey (``I;16*``, and ``I`` holding 0..65535, as 16-bit PNGs and TIFFs open)
    keeps its top 8 bits and wider ``I`` values are scaled from the int32 range, where PIL's ``convert`` would clip
    every value above 255 to white."""
    if image.mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.uint16) >> 8
    elif image.mode == "I":
        values = np.clip(np.asarray(image, dtype=np.int64), 0, None)
        grey = values >> (8 if values.max(initial=0) <= 0xFFFF else 23)
    else:
        return image.convert("RGB")
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")


def _max_image_pixels() -> int | None:
    """The pixel limit ``CIL_MAX_IMAGE_PIXELS`` sets (0: no limit), or None when unset (PIL's own check applies)."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return None
    try:
        limit = int(value.replace("_", "").replace(",", ""))
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r} must be a whole number of pixels (0: no limit)") from None
    if limit < 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r} must be a whole number of pixels (0: no limit)")
    return limit


@contextmanager
def _without_pil_pixel_check() -> Iterator[None]:
    # PIL reads its decompression-bomb limit from a module global, with no per-call argument; it is switched off only
    # while one file opens (the caller checks the size itself) and put back even when decoding fails.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _pil_loader(path: str) -> Image.Image:
    """Decodes ``path`` to RGB (16-bit grey scaled, see :func:`_rgb`); any failure is one ``ValueError`` naming it.

    Images over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``: PIL refuses more than twice its
    89,478,485 pixels) are refused; the environment variable ``CIL_MAX_IMAGE_PIXELS`` replaces that limit: images
    with more pixels (width x height) than it are refused, 0 refuses none. An environment variable rather than a
    config key, so DataLoader workers inherit it and no saved config or stream signature changes.
    """
    limit = _max_image_pixels()
    try:
        if limit is None:
            with Image.open(path) as image:
                return _rgb(image)
        with _without_pil_pixel_check(), Image.open(path) as image:
            pixels = image.width * image.height
            if limit and pixels > limit:
                raise ValueError(
                    f"image {path!r} has {image.width}x{image.height} = {pixels:,} pixels, more than "
                    f"{MAX_PIXELS_ENV}={limit}; raise it (0: no limit) if you trust the file, or downscale the image"
                )
            return _rgb(image)
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"image {path!r} is too large to decode safely ({error}); if you trust the file, set {MAX_PIXELS_ENV} "
            "to its pixel count or more (0: no limit), or downscale the image"
        ) from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {path!r} ({error}); delete or replace the file") from error


class ImageFolderDataset(Dataset[tuple[Image.Image, int]]):
    """``root/<class>/.../<image>`` as ``(RGB PIL image, class index)``, read like torchvision's ``ImageFolder``
    (classes sorted by folder name, images in sorted order, sub-folders of a class included, torchvision's image
    extensions, case-insensitive), with the same ``classes``, ``class_to_idx``, ``samples``, ``imgs`` and ``targets``,
    and these differences:

    * hidden entries (names starting with ``.``: ``.ipynb_checkpoints/``, macOS ``._photo.jpg``, ...) are skipped,
      whether class folders, sub-folders or files;
    * symlinks to directories *inside* a class folder are not followed (logged once, with an example): torchvision
      walks with ``followlinks=True``, so a link back to a parent loops until the OS gives up, reading the same
      images dozens of times, and a link into another class labels its images twice; refusing cycles alone would
      still let that second case through. Symlinks to image files are read;
    * a class folder that is itself a symlink is followed (assembling a dataset from links is common), unless it
      leads to the root or one of its parents (a cycle) or overlaps another class folder (the same images under two
      labels): both are refused with a ``ValueError`` naming the link;
    * an empty class folder or no class folder at all is a one-line ``FileNotFoundError``; an unreadable image is a
      one-line ``ValueError`` naming the file when it is loaded, as are images over the pixel limit
      (see :func:`_pil_loader`).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = str(root)
        self.loader: Callable[[str], Image.Image] = _pil_loader
        try:
            classes, folders = self._class_folders(Path(root))
            self.samples = self._images(Path(root), classes, folders)
        except FileNotFoundError:
            raise
        except OSError as error:  # unlistable folder (permissions, a vanished mount)
            raise ValueError(f"ImageFolder {self.root!r}: cannot list {error.filename!r} ({error.strerror})") from None
        self.classes = classes
        self.class_to_idx = {name: index for index, name in enumerate(classes)}
        self.imgs = self.samples
        self.targets = [label for _, label in self.samples]

    def _class_folders(self, root: Path) -> tuple[list[str], list[Path]]:
        with os.scandir(root) as listing:
            entries = sorted((e for e in listing if not e.name.startswith(".") and e.is_dir()), key=lambda e: e.name)
        if not entries:
            raise FileNotFoundError(
                f"ImageFolder {self.root!r} has no class folder; put the images in one sub-folder per class"
            )
        real_root = root.resolve()
        real = [(entry.name, Path(entry.path).resolve()) for entry in entries]
        for name, target in real:
            if real_root.is_relative_to(target):
                raise ValueError(
                    f"ImageFolder {self.root!r}: class folder {name!r} links to {str(target)!r}, which contains the "
                    "root (a cycle); remove the link"
                )
        # a folder inside another sorts right after it (or after one that is itself inside it) by path components
        ordered = sorted(real, key=lambda item: item[1].parts)
        for (name, target), (other, other_target) in itertools.pairwise(ordered):
            if other_target.is_relative_to(target):
                raise ValueError(
                    f"ImageFolder {self.root!r}: class folders {name!r} and {other!r} lead to the same images through "
                    f"a symlink ({str(other_target)!r}); remove the link or copy the images"
                )
        return [entry.name for entry in entries], [Path(entry.path) for entry in entries]

    def _images(self, root: Path, classes: list[str], folders: list[Path]) -> list[tuple[str, int]]:
        samples: list[tuple[str, int]] = []
        links: list[str] = []
        empty: list[str] = []
        for label, folder in enumerate(folders):
            found: list[tuple[str, list[str]]] = []
            for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise):  # followlinks=False: see docstring
                links += [os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                names = [f for f in filenames if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
                found.append((dirpath, sorted(names)))
            before = len(samples)
            samples += [(os.path.join(dirpath, name), label) for dirpath, names in sorted(found) for name in names]
            if len(samples) == before:
                empty.append(classes[label])
        if empty:
            raise FileNotFoundError(
                f"ImageFolder {self.root!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in class folder(s) "
                f"{empty[:5]}{' ...' if len(empty) > 5 else ''}; add images or remove the folders"
            )
        if links:
            log.warning(
                "ImageFolder %r: did not follow %d directory symlink(s) inside class folders (e.g. %r); copy the "
                "images in if they belong to that class",
                self.root,
                len(links),
                os.path.relpath(min(links), root),
            )
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return self.loader(path), label


def _raise(error: OSError) -> None:
    raise error


def image_folder(root: str | os.PathLike[str]) -> ImageFolderDataset:
    """An :class:`ImageFolderDataset` (one sub-folder per class, hidden entries skipped, see there for symlinks)
    whose problems are one-line errors naming the root or the file."""
    path = _checked_root(root, "ImageFolder", "Point it at a folder with one sub-folder of images per class.")
    if not path.is_dir():
        raise FileNotFoundError(
            f"ImageFolder: data root {str(path)!r} is a file; point it at a folder of class folders"
        )
    return ImageFolderDataset(path)


_HEAD_BYTES = 1 << 16
# Above this many files the duplicate check is skipped: on ImageNet-sized folders most sizes collide and the check
# would read gigabytes at every stream build. CIL_DUPLICATE_CHECK_MAX_FILES sets another bound (0: never check).
_DUPLICATE_CHECK_MAX_FILES = 200_000


def _digest(path: str, limit: int | None = None) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if limit is not None:
            digest.update(handle.read(limit))
        else:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.digest()


def find_duplicates(paths: Sequence[str]) -> list[list[str]]:
    """Groups (two or more, in input order) of byte-identical files among ``paths`` (SHA-256 of the content).

    Only files whose sizes collide are read, first their first 64 KiB, then in full where those collide too, so a
    folder of distinct JPEGs costs little more than a ``stat`` per file. Files that cannot be read are left out (the
    loader names them when they are loaded).
    """
    by_size: dict[int, list[str]] = defaultdict(list)
    for path in paths:
        try:
            by_size[os.stat(path).st_size].append(path)
        except OSError:
            continue
    groups: list[list[str]] = []
    for size, same_size in by_size.items():
        if len(same_size) < 2:
            continue
        by_head: dict[bytes, list[str]] = defaultdict(list)
        for path in same_size:
            try:
                by_head[_digest(path, _HEAD_BYTES)].append(path)
            except OSError:
                continue
        for same_head in by_head.values():
            if len(same_head) < 2:
                continue
            if size <= _HEAD_BYTES:  # the head was the whole file
                groups.append(same_head)
                continue
            by_content: dict[bytes, list[str]] = defaultdict(list)
            for path in same_head:
                try:
                    by_content[_digest(path)].append(path)
                except OSError:
                    continue
            groups += [group for group in by_content.values() if len(group) > 1]
    order = {path: i for i, path in enumerate(paths)}
    return sorted(groups, key=lambda group: order[group[0]])


def warn_duplicates(splits: Mapping[str, Sequence[str]], root: str | os.PathLike[str]) -> int:
    """Logs one warning when byte-identical image files could sit on both sides of a train / test split; returns
    how many files are such copies (0: nothing logged).

    ``splits`` maps split names (``train``, ``val``, ``test``) to image paths. With several splits, a file counts
    when a copy of it is in an earlier split (a test image that is also a training image); with one (a root that the
    stream splits itself, seeded), every extra copy counts, as the split may put the copies on different sides.

    A warning, not an error: a copy inflates accuracy a little, but published datasets carry such copies and a
    benchmark is defined on them as published, so refusing would block the standard setting; the warning names how
    many and one pair, so the numbers are not silently off, and deleting the copies fixes it.
    """
    files = [path for paths in splits.values() for path in paths]
    bound = int(os.environ.get("CIL_DUPLICATE_CHECK_MAX_FILES", _DUPLICATE_CHECK_MAX_FILES))
    if len(files) > bound:
        log.info(
            "ImageFolder %r: %d files, more than CIL_DUPLICATE_CHECK_MAX_FILES=%d; not checked for duplicates",
            str(root), len(files), bound,
        )  # fmt: skip
        return 0
    split_of = {path: name for name, paths in splits.items() for path in paths}
    rank = {name: index for index, name in enumerate(splits)}
    groups = find_duplicates(files)
    count, example = 0, None
    for group in groups:
        if len(splits) == 1:
            extra = group[1:]
        else:
            first = min(rank[split_of[path]] for path in group)
            extra = [path for path in group if rank[split_of[path]] > first]
        if extra:
            count += len(extra)
            example = example or (group[0], extra[0])
    if example is None:
        return 0
    base = str(root)

    def short(path: str) -> str:
        return os.path.relpath(path, base)

    if len(splits) == 1:
        log.warning(
            "ImageFolder %r: %d file(s) are byte-identical copies of other files in it (e.g. %r and %r); the train / "
            "test split can put copies on both sides and inflate accuracy: delete the copies",
            base, count, short(example[0]), short(example[1]),
        )  # fmt: skip
    else:
        log.warning(
            "ImageFolder %r: %d file(s) in a later split (%s) are byte-identical to files in an earlier one (e.g. %r "
            "and %r); accuracy on them is inflated: delete the copies",
            base, count, " / ".join(splits), short(example[0]), short(example[1]),
        )  # fmt: skip
    return count


def torchvision_dataset(name: str, root: str | os.PathLike[str], train: bool, download: bool = False) -> Dataset[Any]:
    """A torchvision dataset class by name (``CIFAR100``, ``MNIST``, ...) from a local root, with a clear error."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None or not isinstance(cls, type):
        raise KeyError(f"torchvision.datasets has no dataset {name!r}")
    path = Path(root).expanduser()
    if not download and not path.exists():
        raise FileNotFoundError(
            f"{name}: data root {str(path)!r} does not exist. Put the dataset there (or set download: true on a "
            "machine with internet access)."
        )
    try:
        return cls(str(path), train=train, download=download)
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name}: no usable copy under {str(path)!r} ({error}). Put the dataset files there or set download: true."
        ) from error


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    test_fraction: float,
    seed: int,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class train / test split of a dataset that has no official one, with optional per-class caps.

    The split depends only on ``seed`` (not on the run's seed), so every run of a stream tests on the same images.
    Returns ``(train_indices, test_indices)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = np.asarray(labels)
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_test = max(1, round(test_fraction * len(members)))
        test.append(members[:n_test][:test_per_class])
        train.append(members[n_test:][:train_per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
