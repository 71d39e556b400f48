"""L2P: Learning to Prompt for continual learning.

Wang, Zhang, Lee, Zhang, Sun, Ren, Su, Perot, Dy, Pfister. "Learning to Prompt for Continual Learning" (CVPR 2022).
Facts from LAMDA-PILOT@5240714 (``models/l2p.py``, ``backbone/prompt.py``, ``backbone/vit_l2p.py``,
``exps/l2p.json``) and its source, JH-LEE-KR/l2p-pytorch@f7bc994 (the PyTorch port of the authors' JAX code).

The ViT stays frozen. A pool of 10 prompts of 5 tokens, each with a key (:class:`cil.layers.PromptPool`): an image's
query is the frozen ViT's final-norm [CLS] feature (one extra forward without prompts), it takes the 5 prompts whose
keys are nearest, their 25 tokens enter after the class token, and the linear head reads the mean of their outputs.
Loss: cross-entropy over the current task's classes (earlier classes' logits masked, as ``train_mask`` does) minus
0.1 times the key-matching term. Adam (lr 0.001875 = 0.03 x 16 / 256, no schedule, a fresh optimizer per task) trains
the prompts, the keys and the head only.

Departures, each checked against their code:

* Selection is per image, at training and at test time. Their configs select batch-wise (the 5 prompts most chosen in
  the batch serve every image), also at test time over class-sorted test batches, which lets a batch vote on its task;
  ``batchwise_selection=True`` restores it, named for what it is (README: fair evaluation).
* The head grows by each task's classes (:class:`cil.heads.IncrementalLinear`, timm's truncated-normal init); theirs
  is one 100-class layer made at the start. Only the seen rows are ever scored or trained, so the two differ in the
  random draws of the rows, not in the distribution.
* The image normalisation is the backbone's (timm's mean / std); their transforms skip ``Normalize``.
* No gradient clipping, as PILOT (l2p-pytorch clips the norm at 1.0).
* The query pass is not cached between epochs (it could be: the frozen ViT's features of an image under the
  evaluation transform do not change).

Not yet compared side by side with PILOT's L2P on identical inputs (issue 19): until it is, its numbers are ours.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cil.backbones import Backbone
from cil.heads import IncrementalLinear
from cil.layers import PromptPool, prompted_tokens
from cil.method import CILMethod, register_method
from cil.task import Task


@register_method("l2p")
class L2P(CILMethod):
    """A frozen ViT, a prompt pool selected per image by key matching, and a linear head over the prompt tokens.

    Args:
        backbone: A timm Vision Transformer (frozen).
        pool_size: Prompts in the pool.
        length: Tokens per prompt.
        top_k: Prompts per image.
        pull_weight: Weight of the key-matching term subtracted from the loss.
        batchwise_selection: The batch's most chosen prompts for every image of it, as L2P's configs (leaks task
            identity through the test batch; off by default).
        lr: Adam learning rate (constant).
        weight_decay: Adam weight decay.
        epochs: Epochs per task.
    """

    def __init__(
        self,
        backbone: Backbone,
        pool_size: int = 10,
        length: int = 5,
        top_k: int = 5,
        pull_weight: float = 0.1,
        batchwise_selection: bool = False,
        lr: float = 0.001875,
        weight_decay: float = 0.0,
        epochs: int = 5,
    ) -> None:
        super().__init__(backbone)
        vit: Any = backbone.model
        if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
            raise ValueError(f"L2P prompts a timm Vision Transformer; {backbone.name!r} is not one")
        self.backbone.requires_grad_(False)
        dim = int(vit.embed_dim)
        self.pool = PromptPool(dim, pool_size, length, top_k, batchwise=batchwise_selection)
        self.head: IncrementalLinear = IncrementalLinear(dim, init="trunc_normal")
        self.pull_weight, self.lr, self.weight_decay, self.epochs = pull_weight, lr, weight_decay, epochs

    def trainer_overrides(self, task: Task) -> dict[str, Any]:
        return {"max_epochs": self.epochs}

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's final-norm [CLS] feature of each image, ``[B, D]`` (no prompts)."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return self.backbone(x)
        finally:
            self.backbone.train(was_training)

    def prompted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding [B, D], key-matching term [])``: the mean output of each image's chosen prompt tokens."""
        tokens, _, pull = self.pool.select(self.query(x))  # [B, k * L, D]
        outputs = prompted_tokens(self.backbone.model, x, tokens)  # [B, 1 + k * L + N, D]
        prefix = int(getattr(self.backbone.model, "num_prefix_tokens", 1))
        return outputs[:, prefix : prefix + tokens.shape[1]].mean(dim=1), pull

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompted(x)[0]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        z, pull = self.prompted(x)
        known = len(self.seen_classes) - len(self.new_classes)
        logits = self.head(z)[:, known:]  # [B, C_new]: earlier classes are masked out of the softmax (train_mask)
        loss = F.cross_entropy(logits, y - known) - self.pull_weight * pull
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train/pull", pull, on_epoch=True, batch_size=len(y))
        return loss
