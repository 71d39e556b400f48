"""FeCAM: a Mahalanobis-distance classifier with one shrunk, normalised covariance per class, on frozen features.

Goswami, Liu, Twardowski, van de Weijer. "FeCAM: Exploiting the Heterogeneity of Class Distributions in
Exemplar-Free Continual Learning" (NeurIPS 2023; arXiv:2309.14062). Facts from the authors' code
(``dipamgoswami/FeCAM@d2479b7``: ``FeCAM_vit_cifar100.py`` / ``FeCAM_vit_imagenet-r.py`` for pre-trained ViTs,
``models/fecam.py`` and ``models/base.py`` for ResNets) and LAMDA-PILOT's port (``models/fecam.py``,
``exps/fecam*.json``).

The authors' ViT scripts, the defaults here: no training at all. After every task, each new class's features
(L2-normalised class tokens of the frozen PTM) give a mean and a covariance; the covariance is shrunk,
``S + a1 * mean(diag S) * I`` (``a1 = 1``; ``a2 = 0`` for the off-diagonal term), and normalised to a correlation
matrix; a test feature goes to the class with the smallest ``(z - mu)^T S^+ (z - mu)`` (``S^+`` the pseudo-inverse).

Switches reproduce the other two codes:

- ResNet code (their many-shot CIL): ``tukey_beta: 0.5`` (Tukey's ladder of powers, ``z^b``, ``log z`` at 0, on
  non-negative features only), ``features: normalize_at_distance`` (statistics of raw features; test feature and
  class mean normalised when the distance is taken), ``shrink_off_diagonal: 1``.
- LAMDA-PILOT's port: ``adapt: adapter`` (first-session adaptation as APER's, :mod:`cil.adaptation`),
  ``features: normalize_at_distance``, ``shrink: 100, shrink_relative: false`` (``S + 100 I``),
  ``covariance_normalization: row_correlation`` (their ``torch.corrcoef(S)``: the correlations between the *rows*
  of ``S``, which is not ``S``'s correlation matrix; the authors divide by the standard deviations).

Departures from the authors' code:

- Tukey's transform applies to every feature before the statistics, so a class mean is the mean of transformed
  features; their ResNet code transforms the mean of raw features instead.
- Their ResNet code shrinks each covariance twice (the second time the shrunk one); one shrinkage here.
- Pseudo-inverses are computed in float64 (as their NumPy ViT scripts) and stored, as are the means, in float32:
  ``D^2`` floats per class (2.4 MB at D = 768) in every checkpoint. Distances are float32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cil.adaptation import FirstTaskAdaptation
from cil.backbones import Backbone
from cil.gaussians import MahalanobisHead, class_statistics, correlation, shrink_covariance
from cil.method import FeatureFn, register_method
from cil.task import Task

__all__ = ["FeCAM"]

FEATURES = ("normalize", "normalize_at_distance", "raw")
NORMALIZATIONS = ("correlation", "row_correlation", "none")


@register_method("fecam")
class FeCAM(FirstTaskAdaptation):
    """FeCAM (see the module docstring).

    Args:
        backbone: The pre-trained model (frozen unless ``adapt`` trains it on the first task).
        adapt: ``none`` (the authors' ViT scripts) or a first-session adaptation (LAMDA-PILOT: ``adapter``).
        epochs: First-session epochs (PILOT: 20).
        lr: First-session SGD learning rate (PILOT: 0.01).
        momentum: SGD momentum.
        weight_decay: First-session weight decay (PILOT: 5e-4).
        peft_options: Overrides of the PEFT module's hyper-parameters.
        features: ``normalize`` (L2-normalise features before the statistics: the authors' ViT scripts),
            ``normalize_at_distance`` (statistics of raw features; feature and mean normalised in the distance: their
            ResNet code and PILOT) or ``raw``.
        tukey_beta: Tukey's transform ``z^b`` (``log z`` at 0) before everything; None: off (ViT features are
            signed).
        shrink: ``a1``, the diagonal shrinkage (authors: 1, relative to the mean variance).
        shrink_off_diagonal: ``a2``, the off-diagonal shrinkage (authors' ViT scripts: 0).
        shrink_relative: Scale ``a1`` / ``a2`` by the mean variance / mean covariance (authors) or not (PILOT).
        covariance_normalization: ``correlation`` (authors), ``row_correlation`` (PILOT's ``corrcoef``) or ``none``.
    """

    supports_distributed = True  # tests/test_distributed.py

    def __init__(
        self,
        backbone: Backbone,
        adapt: str = "none",
        epochs: int = 20,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        peft_options: dict[str, Any] | None = None,
        features: str = "normalize",
        tukey_beta: float | None = None,
        shrink: float = 1.0,
        shrink_off_diagonal: float = 0.0,
        shrink_relative: bool = True,
        covariance_normalization: str = "correlation",
    ) -> None:
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        if covariance_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"covariance_normalization must be one of {NORMALIZATIONS}, got {covariance_normalization!r}"
            )
        super().__init__(backbone, adapt, epochs, lr, momentum, weight_decay, peft_options)
        self.features, self.tukey_beta = features, tukey_beta
        self.shrink, self.shrink_off_diagonal, self.shrink_relative = shrink, shrink_off_diagonal, shrink_relative
        self.covariance_normalization = covariance_normalization
        self.head: MahalanobisHead = MahalanobisHead(backbone.num_features)

    def _statistics_features(self, z: torch.Tensor) -> torch.Tensor:
        """The features statistics are taken of: Tukey-transformed, normalised if ``features: normalize``."""
        if self.tukey_beta is not None:
            if (z < 0).any() or (self.tukey_beta == 0 and (z == 0).any()):
                raise ValueError(
                    "Tukey's transform needs non-negative features (positive for tukey_beta 0, the log) and this "
                    "backbone's are not (a ViT's class token is signed): set tukey_beta to null"
                )
            z = z.log() if self.tukey_beta == 0 else z.pow(self.tukey_beta)
        return F.normalize(z, dim=-1) if self.features == "normalize" else z

    def after_task(self, task: Task, features: FeatureFn) -> None:
        super().after_task(task, features)
        embeddings, labels = features(task.train)  # [N, D]
        classes = list(self.new_classes)
        means, covs = class_statistics(self._statistics_features(embeddings.double()), labels, classes)
        for mean, cov, c in zip(means, covs, classes, strict=True):
            cov = shrink_covariance(cov, self.shrink, self.shrink_off_diagonal, self.shrink_relative)
            if self.covariance_normalization == "correlation":
                cov = correlation(cov)
            elif self.covariance_normalization == "row_correlation":
                cov = torch.corrcoef(cov)
            if self.features == "normalize_at_distance":
                mean = F.normalize(mean, dim=-1)
            self.head.set_class(c, mean, cov)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        z = self._statistics_features(z.float())
        if self.features == "normalize_at_distance":
            z = F.normalize(z, dim=-1)
        return self.head(z)  # [B, C]: minus the squared Mahalanobis distances
