"""Ridge regression on random-projection features, updated one task at a time without keeping any image.

RanPAC's classifier: features ``h = relu(z P)`` (``P [D, M]`` fixed random Gaussian), one-hot targets ``y``; after
every task the Gram matrix ``G = sum h^T h [M, M]`` and the moments ``Q = sum h^T y [M, C]`` grow by the task's
sums, and the readout is ``W = (G + lambda I)^-1 Q``. Summing is exact, so after task ``t`` the readout equals a batch
ridge regression on every image seen (tests/test_ranpac.py checks it to 1e-5 in float64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RandomProjectionRidge", "select_ridge"]


def select_ridge(
    features: torch.Tensor, targets: torch.Tensor, ridges: Sequence[float], fit_fraction: float = 0.8
) -> float:
    """The ridge of ``ridges`` whose readout, fitted on the first ``fit_fraction`` of ``features [N, M]`` /
    ``targets [N, C]``, has the lowest mean squared error on the rest (RanPAC's authors: the first 80 % of the task's
    shuffled training features, ``10^-8 .. 10^8``). Ties keep the first (smallest)."""
    split = int(len(features) * fit_fraction)
    if split == 0 or split == len(features):
        raise ValueError(f"choosing the ridge needs images on both sides of the split; this task has {len(features)}")
    fit_h, held_h = features[:split], features[split:]
    gram = fit_h.T @ fit_h  # [M, M]
    moments = fit_h.T @ targets[:split]  # [M, C]
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    losses = []
    for ridge in ridges:
        readout = torch.linalg.solve(gram + ridge * eye, moments)  # [M, C]
        losses.append(float(F.mse_loss(held_h @ readout, targets[split:])))
    return float(ridges[min(range(len(losses)), key=losses.__getitem__)])


class RandomProjectionRidge(nn.Module):
    """``logits = relu(z P) W^T``: a frozen random projection and a ridge readout over all seen classes.

    Args:
        in_features: Embedding width ``D``.
        projection_dim: ``M`` (RanPAC: 10,000), or 0: no projection, ``h = z`` (``M = D``). ``G`` holds ``M^2``
            numbers: 400 MB at M = 10,000 in float32, 800 MB in float64, in every checkpoint; solving takes about as
            much again on the device that solves.
        dtype: Of ``G``, ``Q``, the solve and the readout (the authors' code: float32).
        cosine: Score by the cosine between ``relu(z P)`` and the readout's rows (LAMDA-PILOT's port) instead of
            the plain product (the authors' RanPAC code); the two rank classes differently.
    """

    projection: torch.Tensor
    gram: torch.Tensor
    moments: torch.Tensor
    readout: torch.Tensor

    def __init__(
        self, in_features: int, projection_dim: int, dtype: torch.dtype = torch.float32, cosine: bool = False
    ) -> None:
        super().__init__()
        self.in_features, self.projection_dim, self.dtype, self.cosine = in_features, projection_dim, dtype, cosine
        self.width = projection_dim or in_features  # M
        self.register_buffer("projection", torch.zeros(in_features, projection_dim))  # [D, M], drawn by draw()
        self.register_buffer("gram", torch.zeros(self.width, self.width, dtype=dtype))  # [M, M]
        self.register_buffer("moments", torch.zeros(self.width, 0, dtype=dtype))  # [M, C]
        self.register_buffer("readout", torch.zeros(0, self.width, dtype=dtype))  # [C, M]

    @property
    def num_classes(self) -> int:
        return self.readout.shape[0]

    def draw(self, generator: torch.Generator | None = None) -> None:
        """Draws ``P`` with standard normal entries (the authors' ``torch.randn(D, M)``)."""
        self.projection.copy_(torch.randn(self.in_features, self.projection_dim, generator=generator))

    def expand(self, num_new: int) -> None:
        self.moments = torch.cat([self.moments, self.moments.new_zeros(self.width, num_new)], dim=1)
        self.readout = torch.cat([self.readout, self.readout.new_zeros(num_new, self.width)])

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """``relu(z P)`` ``[N, M]`` in the module's dtype (``z`` itself without a projection), also under bf16
        autocast: sums over M = 10,000 products in bf16 would move scores by about 1 %."""
        if not self.projection_dim:
            return z.to(self.dtype)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return F.relu(z.to(self.dtype) @ self.projection.to(device=z.device, dtype=self.dtype))

    @torch.no_grad()
    def accumulate(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adds the images' sums to ``G`` and ``Q`` (``z [N, D]`` on any device, ``labels [N]`` global ids) and
        returns their projected features ``[N, M]`` on ``z``'s device."""
        h = self.project(z)  # [N, M]
        y = F.one_hot(labels.to(z.device), self.num_classes).to(h.dtype)  # [N, C]
        self.gram += (h.T @ h).to(self.gram.device)
        self.moments += (h.T @ y).to(self.moments.device)
        return h

    @torch.no_grad()
    def solve(self, ridge: float, device: torch.device | str | None = None) -> None:
        """``W = ((G + ridge I)^-1 Q)^T``, solved on ``device`` (default: where ``G`` is)."""
        gram = self.gram.to(device or self.gram.device)
        eye = torch.eye(self.width, dtype=gram.dtype, device=gram.device)
        readout = torch.linalg.solve(gram + ridge * eye, self.moments.to(gram.device))  # [M, C]
        self.readout.copy_(readout.T.to(self.readout.device))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, readout = self.project(z), self.readout.to(z.device)  # [B, M], [C, M]
        with torch.autocast(device_type=z.device.type, enabled=False):
            if self.cosine:
                return F.linear(F.normalize(h, dim=1), F.normalize(readout, dim=1)).float()  # [B, C]
            return (h @ readout.T).float()  # [B, C]
