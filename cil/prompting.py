"""What the prompt-pool methods (L2P, DualPrompt, CODA-Prompt) share: a frozen timm ViT asked twice per image.

The first, unprompted forward gives the image's *query* (the final-norm [CLS] feature); the query chooses or weights
prompts; the second forward runs with them, and a linear head over its output is trained with cross-entropy on the
current task's classes only (earlier classes' logits are left out of the softmax, as their authors' ``train_mask``
does), plus a method's own auxiliary term. Subclasses write :meth:`PromptMethod.prompted` and the optimizer.

Queries of evaluation images are cached by the images' bytes: the frozen model gives an image the same query at
every evaluation, and the engine evaluates every seen task after every task. Training batches are augmented (a new
crop every epoch), so they are never cached.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F

from cil.backbones import Backbone
from cil.heads import IncrementalLinear
from cil.method import CILMethod
from cil.task import Task

CACHE_QUERIES = ("auto", "always", "never")


class QueryCache:
    """Frozen queries ``[D]`` by image content (a BLAKE2b digest of the image tensor's bytes, shape and dtype).

    ``"auto"`` caches images that are on the CPU only: there hashing costs a small fraction of a ViT forward, while
    on an accelerator copying the batch to the host to hash it costs more than the forward it saves.
    """

    def __init__(self, mode: str = "auto") -> None:
        if mode not in CACHE_QUERIES:
            raise ValueError(f"cache_queries must be one of {CACHE_QUERIES}, got {mode!r}")
        self.mode = mode
        self._queries: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def active(self, images: torch.Tensor) -> bool:
        return self.mode == "always" or (self.mode == "auto" and images.device.type == "cpu")

    @staticmethod
    def _key(image: torch.Tensor) -> bytes:
        digest = hashlib.blake2b(image.detach().contiguous().cpu().numpy().tobytes(), digest_size=16)
        digest.update(f"{tuple(image.shape)}{image.dtype}".encode())
        return digest.digest()

    def __call__(self, images: torch.Tensor, compute: Any) -> torch.Tensor:
        """``compute(images [M, 3, H, W]) -> [M, D]`` runs only on the images not seen before."""
        keys = [self._key(image) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self._queries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = compute(images[missing])  # [M, D]
            for i, query in zip(missing, fresh, strict=True):
                self._queries[keys[i]] = query
        return torch.stack([self._queries[key] for key in keys])  # [B, D]

    def clear(self) -> None:
        self._queries.clear()


class PromptMethod(CILMethod):
    """A frozen timm ViT, its unprompted [CLS] feature as each image's query, a prompted forward and a linear head.

    Args:
        backbone: A timm Vision Transformer (frozen).
        epochs: Epochs per task.
        cache_queries: ``auto`` (evaluation images on the CPU), ``always`` or ``never``; see :class:`QueryCache`.
        head_init: The new head rows' initialisation (:class:`cil.heads.IncrementalLinear`): ``trunc_normal``, as
            timm's ViT head that L2P and DualPrompt train, or ``default``, PyTorch's ``nn.Linear`` (CODA-Prompt's).
    """

    def __init__(
        self, backbone: Backbone, epochs: int, cache_queries: str = "auto", head_init: str = "trunc_normal"
    ) -> None:
        super().__init__(backbone)
        vit: Any = backbone.model
        if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
            raise ValueError(f"{type(self).__name__} prompts a timm Vision Transformer; {backbone.name!r} is not one")
        self.backbone.requires_grad_(False)
        self.embed_dim = int(vit.embed_dim)
        self.head: IncrementalLinear = IncrementalLinear(self.embed_dim, init=head_init)
        self.epochs = epochs
        self.queries = QueryCache(cache_queries)

    @property
    def vit(self) -> Any:
        return self.backbone.model

    def trainer_overrides(self, task: Task) -> dict[str, Any]:
        return {"max_epochs": self.epochs}

    @torch.no_grad()
    def _unprompted(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return self.backbone(x)
        finally:
            self.backbone.train(was_training)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's final-norm [CLS] feature of each image, ``[B, D]`` (no prompts, no gradient)."""
        if self.training or not self.queries.active(x):
            return self._unprompted(x)
        return self.queries(x, self._unprompted)

    def prompted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding [B, D], auxiliary loss [])``: the prompted forward, and what the method adds to the loss."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompted(x)[0]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        z, auxiliary = self.prompted(x)
        known = len(self.seen_classes) - len(self.new_classes)
        logits = self.head(z)[:, known:]  # [B, C_new]: earlier classes are left out of the softmax (train_mask)
        loss = F.cross_entropy(logits, y - known) + auxiliary
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train/auxiliary", auxiliary, on_epoch=True, batch_size=len(y))
        return loss
