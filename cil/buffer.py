"""A fixed-size replay buffer filled by reservoir sampling, for replay (ER) and buffer finetuning (FPF, k-FPF).

The buffer sees the stream's training images one at a time, each task's in a seeded random order, and keeps a
uniform sample of all images offered so far (Vitter's algorithm R: after ``n`` offers every image is in the
buffer with probability ``capacity / n``). With ``class_balanced=True`` it follows class-balancing reservoir
sampling instead (CBRS, Chrysakis & Moens, ICML 2020): a full buffer evicts from its largest class, so rare
classes keep their images.

It stores the images exactly as the stream hands them out (PIL images or ``uint8`` arrays, before any transform),
their global labels, the task that brought them and, optionally, logits recorded for distillation. All of it,
and the state of its random generator, is part of :meth:`state_dict`, so a method that owns a buffer puts it in
its checkpoint and a resumed run continues with the same buffer and the same future decisions. The state holds
tensors, numbers and strings only (images as ``uint8`` tensors with the type they came as), so a checkpoint loads
with ``torch.load(weights_only=True)``: reading a run directory never unpickles arbitrary objects.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cil.task import Task, dataset_targets

__all__ = ["BufferDataset", "ReservoirBuffer", "fill_from_task"]


class ReservoirBuffer:
    """Reservoir-sampled memory of ``capacity`` training images.

    Args:
        capacity: Number of images kept.
        seed: Seed of the buffer's own generator (the order images are offered in, which slot they replace).
        class_balanced: Class-balancing reservoir sampling (CBRS) instead of plain reservoir sampling.
    """

    def __init__(self, capacity: int, seed: int = 0, class_balanced: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.class_balanced = class_balanced
        self.rng = np.random.default_rng(seed)  # sampling decisions
        self.draws = torch.Generator().manual_seed(seed)  # replay minibatches
        self.images: list[Any] = []
        self.labels: list[int] = []
        self.tasks: list[int] = []
        self.logits: list[torch.Tensor | None] = []  # per slot: [C_seen at recording] or None
        self.offered = 0  # images offered so far (n in algorithm R)
        self.offered_per_class: Counter[int] = Counter()
        self.full_classes: set[int] = set()  # CBRS: classes that are, or once were, the largest in the buffer

    def __len__(self) -> int:
        return len(self.labels)

    def reseed(self, seed: int) -> None:
        """Restarts both generators (a method reseeds its empty buffer from the run's seed at the first task)."""
        self.rng = np.random.default_rng(seed)
        self.draws.manual_seed(seed)

    # ---- filling ---------------------------------------------------------------------------------------------
    def add_task(self, dataset: Dataset[Any], task_index: int) -> list[int]:
        """Offers every image of ``dataset`` (a task's training set) once, in a random order drawn from the
        buffer's generator. Returns the slots that now hold an image of this task.

        Decisions use the labels only; images are read just for the slots that keep them.
        """
        labels = dataset_targets(dataset)  # [N]
        kept: dict[int, int] = {}  # slot -> dataset index
        for index in self.rng.permutation(len(labels)):
            slot = self._offer(int(labels[index]))
            if slot is not None:
                kept[slot] = int(index)
        for slot, index in kept.items():
            image, label = dataset[index]
            self.images[slot], self.labels[slot], self.tasks[slot], self.logits[slot] = (
                image,
                int(label),
                task_index,
                None,
            )
        return sorted(kept)

    def _offer(self, label: int) -> int | None:
        """One step of the sampler: the slot the offered image goes to, or None if it is not kept."""
        n = self.offered
        self.offered += 1
        self.offered_per_class[label] += 1
        if n < self.capacity:  # still filling: slot n is the next free one
            self._open_slot(label)
            return n
        if not self.class_balanced:
            slot = int(self.rng.integers(0, n + 1))
            if slot < self.capacity:
                self.labels[slot] = label
                return slot
            return None
        return self._offer_balanced(label)

    def _open_slot(self, label: int) -> None:
        """Opens the next slot with ``label`` (its image is read after the task's decisions) so that later decisions in
        the same task see the right class counts."""
        self.images.append(None)
        self.labels.append(label)
        self.tasks.append(-1)
        self.logits.append(None)

    def _offer_balanced(self, label: int) -> int | None:
        counts = Counter(self.labels)
        largest = max(counts.values())
        self.full_classes.update(c for c, m in counts.items() if m == largest)
        if label not in self.full_classes:  # evict a random image of (one of) the largest classes
            candidates = [c for c, m in counts.items() if m == largest]
            victim_class = candidates[int(self.rng.integers(0, len(candidates)))]
        else:  # keep it with probability m_c / n_c, in place of one of its own class
            if self.rng.random() >= counts[label] / self.offered_per_class[label]:
                return None
            victim_class = label
        slots = [i for i, c in enumerate(self.labels) if c == victim_class]
        slot = slots[int(self.rng.integers(0, len(slots)))]
        self.labels[slot] = label
        return slot

    def record_logits(self, slots: Sequence[int], logits: torch.Tensor) -> None:
        """Stores ``logits [len(slots), C]`` as the distillation targets of ``slots``."""
        for slot, row in zip(slots, logits.detach().float().cpu(), strict=True):
            self.logits[slot] = row.clone()

    # ---- reading ---------------------------------------------------------------------------------------------
    def dataset(self, slots: Sequence[int] | None = None, with_slots: bool = False) -> BufferDataset:
        """The buffer (or the given ``slots``) as an ``(image, label)`` dataset, or ``(image, label, slot)``."""
        return BufferDataset(self, list(range(len(self))) if slots is None else list(slots), with_slots)

    def sample_slots(self, size: int) -> torch.Tensor:
        """``size`` distinct slots drawn uniformly (all of them if the buffer holds fewer)."""
        return torch.randperm(len(self), generator=self.draws)[:size]

    def batch(self, slots: torch.Tensor, transform: Callable[[Any], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of ``slots [B]`` through ``transform`` and their labels: ``(x [B, 3, H, W], y [B])``."""
        x = torch.stack([transform(self.images[s]) for s in slots.tolist()])
        return x, torch.as_tensor([self.labels[s] for s in slots.tolist()])

    def stored_logits(self, slots: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Distillation targets of ``slots [B]`` padded to ``num_classes``: ``(logits [B, C], mask [B, C])``, the
        mask true where a logit was recorded (a slot recorded when fewer classes were seen has a shorter row)."""
        targets = torch.zeros(len(slots), num_classes)
        mask = torch.zeros(len(slots), num_classes, dtype=torch.bool)
        for row, slot in enumerate(slots.tolist()):
            stored = self.logits[slot]
            if stored is not None:
                width = min(len(stored), num_classes)
                targets[row, :width] = stored[:width]
                mask[row, :width] = True
        return targets, mask

    def class_counts(self) -> dict[int, int]:
        return dict(sorted(Counter(self.labels).items()))

    def task_counts(self) -> dict[int, int]:
        return dict(sorted(Counter(self.tasks).items()))

    # ---- checkpoint ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "class_balanced": self.class_balanced,
            "rng": self.rng.bit_generator.state,
            "draws": self.draws.get_state(),
            "images": [_image_tensor(image) for image in self.images],  # (kind, tensor) pairs
            "labels": list(self.labels),
            "tasks": list(self.tasks),
            "logits": list(self.logits),
            "offered": self.offered,
            "offered_per_class": dict(self.offered_per_class),
            "full_classes": sorted(self.full_classes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity or state["class_balanced"] != self.class_balanced:
            raise ValueError(
                f"the checkpoint's buffer (capacity {state['capacity']}, class_balanced {state['class_balanced']}) "
                f"does not match this method's (capacity {self.capacity}, class_balanced {self.class_balanced})"
            )
        self.rng.bit_generator.state = state["rng"]
        self.draws.set_state(state["draws"])
        self.images = [_image_from_tensor(kind, tensor) for kind, tensor in state["images"]]
        self.labels = list(state["labels"])
        self.tasks = list(state["tasks"])
        self.logits = list(state["logits"])
        self.offered = int(state["offered"])
        self.offered_per_class = Counter(state["offered_per_class"])
        self.full_classes = set(state["full_classes"])


class BufferDataset(Dataset[tuple[Any, ...]]):
    """A view of buffer slots as ``(image, label)`` samples, or ``(image, label, slot)`` with ``with_slots`` (the
    slot finds a sample's stored logits). Images are raw: the engine applies the transform."""

    def __init__(self, buffer: ReservoirBuffer, slots: list[int], with_slots: bool = False) -> None:
        self.buffer = buffer
        self.slots = slots
        self.with_slots = with_slots
        self.targets = np.asarray([buffer.labels[s] for s in slots], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        slot = self.slots[i]
        sample = (self.buffer.images[slot], self.buffer.labels[slot])
        return (*sample, slot) if self.with_slots else sample


def _image_tensor(image: Any) -> tuple[str, torch.Tensor]:
    """A buffer image as ``(kind, tensor)``, restorable by :func:`_image_from_tensor` to the type it came as."""
    if isinstance(image, torch.Tensor):
        return "tensor", image
    if isinstance(image, np.ndarray):
        return "numpy", torch.from_numpy(np.ascontiguousarray(image))
    if isinstance(image, Image.Image):
        return f"pil:{image.mode}", torch.from_numpy(np.array(image))
    raise TypeError(f"a buffer image must be a tensor, an array or a PIL image to be checkpointed, not {type(image)}")


def _image_from_tensor(kind: str, tensor: torch.Tensor) -> Any:
    if kind == "tensor":
        return tensor
    if kind == "numpy":
        return tensor.numpy()
    if kind.startswith("pil:"):
        image = Image.fromarray(tensor.numpy())
        return image if image.mode == kind[4:] else image.convert(kind[4:])
    raise ValueError(f"unknown buffer image kind {kind!r} in the checkpoint")


def fill_from_task(buffer: ReservoirBuffer, task: Task) -> list[int]:
    """Offers ``task``'s training images to a method's buffer as the task begins; at the first task the buffer is
    first reseeded from the seed the engine gave torch for it (the run's seed), without drawing from torch's RNG, so
    a method with a buffer trains on exactly the batches the same method without one would.
    Returns the slots that now hold images of ``task``."""
    if task.index == 0:
        buffer.reseed(torch.initial_seed() % 2**63)
    return buffer.add_task(task.train, task.index)
