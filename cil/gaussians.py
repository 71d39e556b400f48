"""Class Gaussians over embeddings: classifier alignment on features sampled from them, Mahalanobis classification.

One implementation of the per-class statistics that exemplar-free methods keep instead of images: MOS and SLCA
re-train their heads on features drawn from each seen class's Gaussian (classifier alignment), FeCAM classifies by
the Mahalanobis distance under each class's (shrunk) covariance. All of them start from :func:`class_statistics`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClassGaussians",
    "MahalanobisHead",
    "align_classifier",
    "class_statistics",
    "correlation",
    "shrink_covariance",
]

COVARIANCES = ("full", "diagonal")


@torch.no_grad()
def class_statistics(
    embeddings: torch.Tensor, labels: torch.Tensor, classes: Sequence[int], min_images: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean ``[K, D]`` and unbiased covariance ``[K, D, D]`` (``N - 1`` in the denominator, as
    ``torch.cov`` / ``np.cov``) of ``embeddings [N, D]``, in float64, for ``classes`` in the order given."""
    means, covs = [], []
    for c in classes:
        members = embeddings[labels == c].double()  # [n_c, D]
        if len(members) < min_images:
            raise ValueError(f"class {c} has {len(members)} training image(s); a covariance needs {min_images}")
        means.append(members.mean(0))
        covs.append(torch.cov(members.T))
    return torch.stack(means), torch.stack(covs)


class ClassGaussians(nn.Module):
    """One Gaussian per seen class: means ``[C, D]`` and covariances ``[C, D, D]`` (``full``) or variances ``[C, D]``
    (``diagonal``: ``D`` floats per class instead of ``D^2``, 2.4 MB per class at D = 768 in full).

    Args:
        dim: Embedding width ``D``.
        covariance: ``full`` or ``diagonal``.
        ridge: Added to every covariance's diagonal so its Cholesky factor exists (MOS's authors: 1e-4).
    """

    means: torch.Tensor
    covs: torch.Tensor

    def __init__(self, dim: int, covariance: str = "full", ridge: float = 1e-4) -> None:
        super().__init__()
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.dim, self.covariance, self.ridge = dim, covariance, ridge
        self.register_buffer("means", torch.zeros(0, dim))
        self.register_buffer("covs", torch.zeros((0, dim, dim) if covariance == "full" else (0, dim)))

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def expand(self, num_new: int) -> None:
        self.means = torch.cat([self.means, self.means.new_zeros(num_new, *self.means.shape[1:])])
        self.covs = torch.cat([self.covs, self.covs.new_zeros(num_new, *self.covs.shape[1:])])

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> None:
        """Sets the Gaussians of ``classes`` (global ids) from their embeddings ``[N, D]``."""
        means, covs = class_statistics(embeddings, labels, classes)
        covs = covs + self.ridge * torch.eye(self.dim, dtype=covs.dtype)
        for row, c in enumerate(classes):
            self.means[c] = means[row].to(self.means)
            self.covs[c] = (covs[row] if self.covariance == "full" else covs[row].diagonal()).to(self.covs)

    def sampler(
        self, device: torch.device | str, mean_scale: torch.Tensor | None = None
    ) -> Callable[[int], torch.Tensor]:
        """``draw(n) -> [C, n, D]`` float32: ``n`` features per class, ``s_c mean + L eps`` with ``L`` the
        covariance's Cholesky factor (computed once, in float64, on ``device``), ``eps`` standard normal and ``s_c``
        the class's ``mean_scale [C]`` (default 1; SLCA shrinks older classes' means)."""
        means = self.means.to(device=device, dtype=torch.float64)  # [C, D]
        if mean_scale is not None:
            means = means * mean_scale.to(device=device, dtype=torch.float64)[:, None]
        covs = self.covs.to(device=device, dtype=torch.float64)
        scale = torch.linalg.cholesky(covs) if self.covariance == "full" else covs.sqrt()  # [C, D, D] or [C, D]

        def draw(n: int) -> torch.Tensor:
            noise = torch.randn(len(means), n, means.shape[1], device=means.device, dtype=torch.float64)
            if self.covariance == "full":
                return (means[:, None] + torch.einsum("cde,cne->cnd", scale, noise)).float()
            return (means[:, None] + scale[:, None] * noise).float()

        return draw


def align_classifier(
    head: nn.Module,
    gaussians: ClassGaussians,
    epochs: int,
    lr: float,
    samples_per_class: int,
    batch_size: int,
    weight_decay: float,
    momentum: float = 0.9,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    mean_scale: torch.Tensor | None = None,
) -> float:
    """Re-trains ``head`` (embeddings -> logits over the Gaussians' classes) on features sampled from every class's
    Gaussian, on the head's device: per epoch ``samples_per_class`` fresh draws per class (means scaled by
    ``mean_scale [C]``, see :meth:`ClassGaussians.sampler`), shuffled, in batches of ``batch_size``; SGD with a
    cosine schedule over the epochs; ``loss_fn(logits, targets)``. Returns the last batch's loss."""
    device = next(head.parameters()).device
    draw = gaussians.sampler(device, mean_scale)
    num_classes = gaussians.num_classes
    targets = torch.arange(num_classes, device=device).repeat_interleave(samples_per_class)  # [C * n]
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    loss = torch.tensor(float("nan"))
    with torch.enable_grad():
        for _ in range(epochs):
            samples = draw(samples_per_class).reshape(-1, gaussians.dim)  # [C * n, D]
            order = torch.randperm(len(samples), device=device)
            for index in order.split(batch_size):
                loss = loss_fn(head(samples[index]), targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
    return float(loss.detach())


def shrink_covariance(
    cov: torch.Tensor, diagonal: float, off_diagonal: float = 0.0, relative: bool = True
) -> torch.Tensor:
    """FeCAM's shrinkage of ``cov [D, D]``: ``cov + a1 * v I + a2 * o (1 - I)``, with ``v`` the mean variance and ``o``
    the mean of the non-zero off-diagonal entries when ``relative`` (the authors' code), else ``v = o = 1`` (LAMDA-
    PILOT's port adds ``a1 I``)."""
    eye = torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    if not relative:
        return cov + diagonal * eye + off_diagonal * (1 - eye)
    off = cov * (1 - eye)
    nonzero = off != 0
    off_mean = off.sum() / nonzero.sum().clamp(min=1)
    return cov + diagonal * cov.diagonal().mean() * eye + off_diagonal * off_mean * (1 - eye)


def correlation(cov: torch.Tensor) -> torch.Tensor:
    """``cov / (s s^T)`` with ``s`` the standard deviations: the correlation matrix of ``cov [D, D]``."""
    std = cov.diagonal().sqrt()
    return cov / (std[:, None] * std[None, :])


class MahalanobisHead(nn.Module):
    """``logits[b, c] = -(z_b - mu_c)^T S_c (z_b - mu_c)``: the negative squared Mahalanobis distance to every class,
    with ``S_c`` a stored precision matrix (FeCAM). ``means [C, D]``, ``precisions [C, D, D]`` are buffers, set by
    :meth:`set_class`; the caller transforms ``z`` as the statistics were (normalisation, Tukey)."""

    means: torch.Tensor
    precisions: torch.Tensor

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.register_buffer("means", torch.zeros(0, in_features))
        self.register_buffer("precisions", torch.zeros(0, in_features, in_features))

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def expand(self, num_new: int) -> None:
        self.means = torch.cat([self.means, self.means.new_zeros(num_new, self.in_features)])
        self.precisions = torch.cat(
            [self.precisions, self.precisions.new_zeros(num_new, self.in_features, self.in_features)]
        )

    @torch.no_grad()
    def set_class(self, c: int, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        """Class ``c``'s mean ``[D]`` and the pseudo-inverse of ``covariance [D, D]`` (computed in float64, as the
        authors' NumPy code; a shrunk covariance is invertible, and then the pseudo-inverse is the inverse)."""
        self.means[c] = mean.to(self.means)
        self.precisions[c] = torch.linalg.pinv(covariance.double()).to(self.precisions)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):  # precisions reach 1e4: no bf16 here
            diff = z.float()[:, None, :] - self.means.to(z.device)[None]  # [B, C, D]
            left = torch.einsum("bcd,cde->bce", diff, self.precisions.to(z.device))  # [B, C, D]
            return -(left * diff).sum(-1)  # [B, C]
