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
  ``batchwise_selection=True`` restores it, named for what it is (docs: fair evaluation).
* The head grows by each task's classes (:class:`cil.heads.IncrementalLinear`, timm's truncated-normal init); theirs
  is one 100-class layer made at the start. Only the seen rows are ever scored or trained, so the two differ in the
  random draws of the rows, not in the distribution.
* The image normalisation is the backbone's (timm's mean / std) unless the config sets ``backbone.mean: [0, 0, 0]``
  / ``std: [1, 1, 1]``, as the presets do: their transforms skip ``Normalize``.
* No gradient clipping, as PILOT (l2p-pytorch clips the norm at 1.0).
* The query of an evaluation image is computed once per run (:class:`cil.prompting.QueryCache`); theirs at every
  evaluation. Same value.

Compared side by side with PILOT's L2P on identical inputs (docs/reproduction.md, "L2P"): one training step (query,
selection, pull term, logits, masked loss, gradients, Adam step) and evaluation agree to fp32 rounding, per image and
batch-wise; batch-wise ties now break as theirs.
"""

from __future__ import annotations

import torch

from cil.backbones import Backbone
from cil.layers import PromptPool, prompted_tokens
from cil.method import register_method
from cil.prompting import PromptMethod


@register_method("l2p")
class L2P(PromptMethod):
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
        cache_queries: See :class:`cil.prompting.QueryCache`.
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
        cache_queries: str = "auto",
    ) -> None:
        super().__init__(backbone, epochs, cache_queries)
        self.pool = PromptPool(self.embed_dim, pool_size, length, top_k, batchwise=batchwise_selection)
        self.pull_weight, self.lr, self.weight_decay = pull_weight, lr, weight_decay

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def prompted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding [B, D], -pull_weight x key-matching term)``: the mean output of each image's prompt tokens."""
        prompts, _, pull = self.pool.select(self.query(x))  # [B, k, L, D]
        tokens = prompts.flatten(1, 2)  # [B, k * L, D]
        outputs = prompted_tokens(self.vit, x, tokens)  # [B, 1 + k * L + N, D]
        prefix = int(getattr(self.vit, "num_prefix_tokens", 1))
        return outputs[:, prefix : prefix + tokens.shape[1]].mean(dim=1), -self.pull_weight * pull
