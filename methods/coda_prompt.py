"""CODA-Prompt: continual decomposed attention-based prompting.

Smith, Karlinsky, Gutta, Cascante-Bonilla, Kim, Arbelle, Panda, Feris, Kira. "CODA-Prompt: COntinual Decomposed
Attention-based Prompting for Rehearsal-Free Continual Learning" (CVPR 2023). Facts from the authors' code,
GT-RIPL/CODA-Prompt@6417d4f (``models/zoo.py`` ``CodaPrompt``, ``learners/prompt.py``, ``utils/schedulers.py``,
``configs/cifar-100_prompt.yaml``, ``configs/imnet-r_prompt.yaml``, ``experiments/*.sh``), and LAMDA-PILOT@5240714
(``models/coda_prompt.py``, ``backbone/prompt.py``, ``exps/coda_prompt*.json``), which matches it.

The ViT stays frozen. Blocks 0-4 each have 100 prompt components ``p [8, D]`` with a key ``K`` and an attention
vector ``A`` (:class:`cil.layers.ComponentPool`). An image's prompt in a block is ``sum_n cos(q * A_n, K_n) p_n`` over
the components allocated so far, ``q`` its query (the frozen ViT's final-norm [CLS] feature); its first 4 tokens are
prefixed to the attention's keys, the last 4 to its values (:class:`cil.layers.PrefixSlot`). Each task gets
``100 / tasks`` new components, drawn orthonormal to the earlier ones (Gram-Schmidt); the earlier ones enter the
forward without gradient. The linear head reads the prompted [CLS] token. Loss: cross-entropy over the current
task's classes plus ``ortho_weight`` times the orthogonality penalty (0 in the authors' current configs). Adam (lr
0.001, a fresh optimizer per task) with their cosine schedule: epoch ``e`` runs at ``lr cos(99 pi (e - 1) /
(200 (E - 1)))`` from epoch 1 on, epoch 0 at ``lr``.

Departures, each checked against their code:

* The training loader keeps its last, smaller batch (theirs: ``drop_last=True``); on a stream of small tasks the
  authors' batch of 128 would otherwise drop most images, or all.
* The head grows by each task's classes (PyTorch's ``nn.Linear`` init, as their ``nn.Linear(768, classes)``); theirs
  is one layer made at the start. Images are normalised with the backbone's mean / std unless the config sets
  ``backbone.mean: [0, 0, 0]`` / ``std: [1, 1, 1]`` (the presets do): their transforms do not normalise.
* Allocation skips a zero earlier component instead of redrawing forever (:func:`cil.layers.gram_schmidt_rows`).
* The paper-era release (CODA-Prompt@22948d2) initialised every component orthogonally up front and used an
  orthogonality weight of 0.1 (times 1e-6 inside the penalty); the current code, followed here, allocates per task
  and sets the weight to 0.

Compared side by side with LAMDA-PILOT's CODA-Prompt on identical inputs (docs/reproduction.md, "CODA-Prompt"): the
learning rate per epoch, one training step in task 1 and in task 2 (query, weights, prompts, logits, loss, gradients,
the Adam step, frozen earlier components) and evaluation agree to fp32 rounding. Allocation draws the same numbers
but in another order over the block's tensors (components, keys, attention; theirs keys, attention, components).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from cil.backbones import Backbone
from cil.layers import ComponentPool, inject_prefix_slots, prefixes_set
from cil.method import register_method
from cil.prompting import PromptMethod
from cil.task import Task


def coda_cosine(epochs: int) -> Any:
    """The learning-rate factor of epoch ``e`` in CODA-Prompt's ``CosineSchedule`` as their loop steps it: 1 for
    epochs 0 and 1, then ``cos(99 pi (e - 1) / (200 (E - 1)))``."""

    def factor(epoch: int) -> float:
        if epoch == 0 or epochs <= 1:
            return 1.0
        return math.cos(99 * math.pi * (epoch - 1) / (200 * (epochs - 1)))

    return factor


@register_method("coda_prompt")
class CODAPrompt(PromptMethod):
    """A frozen ViT with attention-weighted prompt components as prefixes in its first blocks.

    Args:
        backbone: A timm Vision Transformer (frozen).
        pool_size: Components per block, shared out equally among the stream's tasks.
        length: Prompt tokens per block (half prefix the keys, half the values; even).
        layers: Blocks that get prompts.
        ortho_weight: Weight of the orthogonality penalty (authors' current configs: 0).
        lr: Adam learning rate at the start of each task.
        weight_decay: Adam weight decay.
        epochs: Epochs per task.
        cache_queries: See :class:`cil.prompting.QueryCache`.
    """

    def __init__(
        self,
        backbone: Backbone,
        pool_size: int = 100,
        length: int = 8,
        layers: Sequence[int] = (0, 1, 2, 3, 4),
        ortho_weight: float = 0.0,
        lr: float = 0.001,
        weight_decay: float = 0.0,
        epochs: int = 20,
        cache_queries: str = "auto",
    ) -> None:
        super().__init__(backbone, epochs, cache_queries, head_init="default")  # their nn.Linear, PyTorch's init
        if length < 2 or length % 2:
            raise ValueError(f"length must be even (half key, half value prefix), got {length}")
        self.layers = [int(i) for i in layers]
        blocks = len(self.vit.blocks)
        if not self.layers or len(set(self.layers)) < len(self.layers) or any(not 0 <= i < blocks for i in self.layers):
            raise ValueError(f"layers must be distinct blocks of the ViT (0 to {blocks - 1}), got {self.layers}")
        self.pools = torch.nn.ModuleList(ComponentPool(self.embed_dim, pool_size, length) for _ in self.layers)
        self.slots = inject_prefix_slots(self.vit, self.layers)
        self.pool_size, self.length, self.ortho_weight = pool_size, length, ortho_weight
        self.lr, self.weight_decay = lr, weight_decay

    @property
    def per_task(self) -> int:
        """Components each task gets: ``pool_size // tasks`` (their ``int(pool_size / n_tasks)``)."""
        return self.pool_size // max(int(getattr(self, "num_tasks", 1)), 1)

    def _span(self) -> tuple[int, int]:
        """The components of the task being learned (or last learned): ``[start, stop)``."""
        return self.task_index * self.per_task, (self.task_index + 1) * self.per_task

    def _pools(self) -> list[ComponentPool]:
        return list(self.pools)  # type: ignore[arg-type]

    def stream_blocker(self, tasks: Sequence[Task]) -> str | None:
        width = self.embed_dim  # keys and attention vectors are D-d; components L x D
        if len(tasks) > self.pool_size:
            return (
                f"CODA-Prompt shares its {self.pool_size} components (pool_size) among the stream's tasks; the stream "
                f"has {len(tasks)}: set pool_size to at least {len(tasks)}"
            )
        if self.pool_size // len(tasks) * len(tasks) > width:
            return (
                f"CODA-Prompt's keys are {width}-d, too few for {self.pool_size // len(tasks) * len(tasks)} orthogonal "
                "components: lower pool_size"
            )
        return None

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, coda_cosine(self.epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    def before_task(self, task: Task) -> None:
        start, stop = self._span()
        for pool in self._pools():
            pool.allocate(start, stop)

    def prompted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompted [CLS] feature [B, D], ortho_weight x orthogonality penalty)``."""
        query = self.query(x)
        start, stop = self._span()
        half = self.length // 2
        prefixes = {}
        for layer, pool in zip(self.layers, self._pools(), strict=True):
            prompt, _ = pool(query, start, stop)  # [B, L, D]
            prefixes[layer] = (prompt[:, :half], prompt[:, half:])
        with prefixes_set(self.slots, prefixes):
            features = self.backbone(x)  # [B, D]
        penalty = query.new_zeros(())
        if self.training and self.ortho_weight:
            penalty = self.ortho_weight * sum((pool.orthogonality(start, stop) for pool in self._pools()), penalty)
        return features, penalty
