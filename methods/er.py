"""ER: experience replay from a reservoir buffer, the every-step replay baseline that k-FPF is measured against.

Chaudhry, Rohrbach, Elhoseiny, Ajanthan, Dokania, Torr, Ranzato. "On Tiny Episodic Memories in Continual
Learning" (arXiv:1902.10486, 2019), as Mammoth implements it (Buzzega et al., NeurIPS 2020), the codebase Zhao et
al. build FPF on: every training step concatenates the current minibatch with an equally sized minibatch drawn
from a reservoir buffer and takes one cross-entropy step over all seen classes on both; the whole network and a
growing linear head are trained.

Departures:
    * Mammoth offers each training step's images to the reservoir while it trains, so the same image is offered
      once per epoch. Here every image of a task is offered exactly once, in a seeded random order, when the task
      starts (:class:`cil.buffer.ReservoirBuffer`); the buffer is a uniform sample of all images seen so far
      either way, but ours does not over-represent tasks trained for more epochs.
    * The buffer images are augmented like the current batch (Mammoth replays them through the training
      transform too).
"""

from __future__ import annotations

from typing import Any, cast

import torch

from cil._distributed import rank_and_world
from cil.backbones import Backbone
from cil.buffer import ReservoirBuffer, fill_from_task
from cil.method import CILMethod, register_method
from cil.task import Task
from methods.finetune import Finetune


def replay_batch(
    method: CILMethod, buffer: ReservoirBuffer, size: int, shard: bool = False
) -> tuple[torch.Tensor, ...]:
    """``size`` buffer images through the engine's training transform, on the method's device: ``(x, y, slots)``.

    ``shard``: under DDP, every rank draws the same ``size x world`` slots (so the buffer's generator stays the same on
    every rank) and replays its own ``size`` of them, as the current minibatch is sharded: one optimiser step then
    replays ``size x world`` distinct images, as one process with a ``world`` times larger batch would. Without it
    (FPF's own steps, which every rank runs alike outside DDP's gradient averaging) every rank replays the same."""
    if method.train_transform is None:
        raise RuntimeError(f"{type(method).__name__} replays buffer images through the engine's training transform")
    rank, world = rank_and_world() if shard else (0, 1)
    slots = buffer.sample_slots(size * world)
    if world > 1 and len(slots) >= world:
        slots = slots[rank::world][:size]
    x, y = buffer.batch(slots, method.train_transform)  # [B, 3, H, W], [B]
    return x.to(method.device, cast(torch.dtype, method.dtype)), y.to(method.device), slots


@register_method("er")
class ER(Finetune):
    """Fine-tuning with every-step replay of a reservoir buffer (saved in the method's ``state_dict``).

    Args:
        backbone: Pre-trained feature extractor (trained).
        buffer_size: Images kept in the buffer (Mammoth's ``buffer_size``; 200 and 500 are the usual values).
        replay_batch_size: Buffer images per step (Mammoth's ``minibatch_size``; the current batch size there).
        class_balanced: Class-balancing reservoir sampling instead of plain reservoir sampling.
        lr: Learning rate (cosine-annealed over each task's fit).
        momentum: SGD momentum.
        weight_decay: Weight decay.
        optimizer: ``"sgd"`` or ``"adamw"``.
        head_lr: The head's own learning rate (None: ``lr``).
    """

    supports_multilabel = False  # the buffer stores one integer label per image
    supports_distributed = True  # replay minibatches are sharded like the current one (replay_batch)

    def __init__(
        self,
        backbone: Backbone,
        buffer_size: int = 500,
        replay_batch_size: int = 32,
        class_balanced: bool = False,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
        head_lr: float | None = None,
    ) -> None:
        super().__init__(
            backbone, lr=lr, momentum=momentum, weight_decay=weight_decay, optimizer=optimizer, head_lr=head_lr
        )
        self.buffer = ReservoirBuffer(buffer_size, class_balanced=class_balanced)
        self.replay_batch_size = replay_batch_size

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        fill_from_task(self.buffer, task)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch  # [B, 3, H, W], [B]
        replay_x, replay_y, _ = replay_batch(self, self.buffer, self.replay_batch_size, shard=True)
        x, y = torch.cat([x, replay_x]), torch.cat([y, replay_y])  # [B + B_replay, ...]
        return super().training_step((x, y), batch_idx)

    def get_extra_state(self) -> Any:
        return {"buffer": self.buffer.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        self.buffer.load_state_dict(state["buffer"])
