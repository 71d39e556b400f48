"""Class-incremental splits of datasets on local disk: any torchvision dataset class, or ImageFolder roots.

These are the papers' settings (CIFAR-100 B0-Inc10, ImageNet-R B0-Inc20, ...) for users who have the data.
"""

from __future__ import annotations

import os

from cil.data import image_folder, torchvision_dataset, warn_duplicates
from cil.stream import Stream, register_stream
from cil.task import class_incremental_split


@register_stream("torchvision_split")
def torchvision_split(
    dataset: str,
    root: str,
    base: int = 0,
    increment: int = 10,
    seed: int | None = None,
    order: list[int] | None = None,
    download: bool = False,
) -> Stream:
    """``torchvision.datasets.<dataset>`` (with a ``train=`` flag, e.g. ``CIFAR100``) split by class.

    Args:
        dataset: Class name in ``torchvision.datasets``.
        root: Local directory holding the dataset.
        base: Classes in the first task (0: ``increment``).
        increment: Classes per later task.
        seed: Class-order seed (default: the run's seed; PILOT uses 1993).
        order: Explicit class order.
        download: Let torchvision download into ``root`` (needs internet).
    """
    train = torchvision_dataset(dataset, root, train=True, download=download)
    test = torchvision_dataset(dataset, root, train=False, download=download)
    names = list(getattr(train, "classes", [])) or None
    tasks = class_incremental_split(
        train, test, base=base, increment=increment, seed=seed, order=order, class_names=names, name=dataset.lower()
    )
    return Stream(
        name=dataset.lower(), tasks=tuple(tasks), metadata={"root": root, "base": base, "increment": increment}
    )


@register_stream("image_folder_split")
def image_folder_split(
    train_root: str,
    test_root: str,
    base: int = 0,
    increment: int = 10,
    seed: int | None = None,
    order: list[int] | None = None,
    dataset_name: str = "image_folder",
) -> Stream:
    """Two ``ImageFolder`` roots (``train_root/<class>/*.jpg``, ``test_root/<class>/*.jpg``) split by class.

    Both roots must have the same class folders (ImageNet-R / ImageNet-A as PILOT prepares them).
    ``dataset_name`` names the stream and its tasks in the results. Hidden entries are skipped and directory symlinks
    inside class folders are not followed (:class:`cil.data.ImageFolderDataset`); test files byte-identical to
    training files are counted and logged as one warning (:func:`cil.data.warn_duplicates`).
    """
    train, test = image_folder(train_root), image_folder(test_root)
    train_classes, test_classes = list(train.classes), list(test.classes)
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))[:5]
        only_test = sorted(set(test_classes) - set(train_classes))[:5]
        raise ValueError(
            f"{train_root!r} and {test_root!r} must have the same class folders (only in train: {only_train}, "
            f"only in test: {only_test})"
        )
    splits = {"train": [path for path, _ in train.samples], "test": [path for path, _ in test.samples]}
    warn_duplicates(splits, os.path.commonpath([os.path.abspath(train.root), os.path.abspath(test.root)]))
    tasks = class_incremental_split(
        train,
        test,
        base=base,
        increment=increment,
        seed=seed,
        order=order,
        class_names=train_classes,
        name=dataset_name,
    )
    return Stream(name=dataset_name, tasks=tuple(tasks), metadata={"train_root": train_root, "test_root": test_root})
