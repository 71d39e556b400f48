"""Classifier heads that grow with the stream."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CosineLinear", "IncrementalLinear", "PrototypeHead", "TaskLinearHeads"]


HEAD_INITS = ("default", "trunc_normal")


class IncrementalLinear(nn.Module):
    """A linear head over all seen classes; :meth:`expand` adds rows for new classes and keeps the old ones.

    Args:
        in_features: Embedding width ``D``.
        init: New rows' initialisation: ``default`` (PyTorch's ``nn.Linear``) or ``trunc_normal`` (timm's ViT head:
            weights truncated-normal with std 0.02, biases zero; what LAMDA-PILOT's and MOS's ViT heads start from).
    """

    def __init__(self, in_features: int, init: str = "default") -> None:
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"head init must be one of {HEAD_INITS}, got {init!r}")
        self.in_features, self.init = in_features, init
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def expand(self, num_new: int) -> None:
        fresh = nn.Linear(self.in_features, num_new)  # PyTorch's default init for the new rows
        if self.init == "trunc_normal":
            nn.init.trunc_normal_(fresh.weight, std=0.02)
            nn.init.zeros_(fresh.bias)
        fresh = fresh.to(device=self.weight.device, dtype=self.weight.dtype)
        self.weight = nn.Parameter(torch.cat([self.weight.data, fresh.weight.data]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, fresh.bias.data]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight, self.bias)  # [B, C]


class PrototypeHead(nn.Module):
    """Cosine similarity to one prototype per class (SimpleCIL / APER / MOS), ``logits [B, C]`` in [-1, 1].

    Prototypes are a buffer, not a parameter: they are computed, never trained.
    """

    prototypes: torch.Tensor

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.register_buffer("prototypes", torch.zeros(0, in_features))

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    def expand(self, num_new: int) -> None:
        self.prototypes = torch.cat([self.prototypes, self.prototypes.new_zeros(num_new, self.in_features)])

    @torch.no_grad()
    def set_prototypes(self, embeddings: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        """Sets the prototype of each class in ``classes`` to the mean of its embeddings ``[N, D]``.

        ``labels`` are global class ids ``[N]``, or multi-hot targets ``[N, len(classes)]`` of a multi-label task
        (a class's prototype is then the mean over the images that show it).
        """
        embeddings = embeddings.to(self.prototypes)
        for column, c in enumerate(classes):
            members = embeddings[labels[:, column] > 0] if labels.ndim == 2 else embeddings[labels == c]
            if len(members) == 0:
                raise ValueError(f"class {c} has no training images, so it has no prototype")
            self.prototypes[c] = members.mean(dim=0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T  # [B, C]


class CosineLinear(nn.Module):
    """``sigma * cos(z, w_c)`` with a learned temperature ``sigma`` (init 1): the training head PILOT's APER / MOS
    use while adapting the backbone on the first task."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.uniform_(self.weight, -1.0 / in_features**0.5, 1.0 / in_features**0.5)
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.sigma * (F.normalize(z, dim=-1) @ F.normalize(self.weight, dim=-1).T)  # [B, C]


class TaskLinearHeads(nn.Module):
    """One linear layer per task (SLCA, LAMDA-PILOT's ``SimpleContinualLinear``), logits concatenated in task order
    ``[B, C]``. :meth:`expand` freezes every earlier head (no gradient, so no weight decay or momentum either) and adds
    a new one, truncated-normal (std 0.02) with zero bias as the authors'."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.heads = nn.ModuleList()

    def linears(self) -> list[nn.Linear]:
        return [head for head in self.heads if isinstance(head, nn.Linear)]

    @property
    def num_classes(self) -> int:
        return sum(self.sizes)

    @property
    def sizes(self) -> list[int]:
        return [head.out_features for head in self.linears()]

    @property
    def device(self) -> torch.device:
        heads = self.linears()
        return heads[0].weight.device if heads else torch.device("cpu")

    def expand(self, num_new: int) -> None:
        self.heads.requires_grad_(False)
        head = nn.Linear(self.in_features, num_new)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.heads.append(head.to(self.device))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(z) for head in self.heads], dim=1)  # [B, C]
