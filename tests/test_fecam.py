"""FeCAM: its classifier is a Mahalanobis distance computed from scratch (in NumPy, the authors' formulas), in the
authors' ViT setting and in LAMDA-PILOT's port; Tukey's transform; refusals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cil.task import Task
from methods.fecam import FeCAM
from tests.conftest import empty_tasks, tiny_backbone

DIM = 32


def _anisotropic(tasks: list[Task], per_class: int, seed: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per task, classes with their own mean and their own (random, correlated) covariance."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for task in tasks:
        parts = []
        for _ in task.classes:
            mixing = torch.randn(DIM, DIM, generator=generator) / DIM**0.5
            parts.append(
                torch.randn(DIM, generator=generator) + torch.randn(per_class, DIM, generator=generator) @ mixing
            )
        out[task.index] = (torch.cat(parts), torch.tensor(task.classes).repeat_interleave(per_class))
    return out


def _fecam(**kwargs: Any) -> FeCAM:
    torch.manual_seed(0)
    return FeCAM(tiny_backbone(), **kwargs)


def _learn(method: FeCAM, tasks: list[Task], feats: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for task in tasks:
        method.begin_task(task)
        method.after_task(task, lambda _data, t=task.index: feats[t])


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _authors_vit_distances(train: np.ndarray, labels: np.ndarray, test: np.ndarray, num_classes: int) -> np.ndarray:
    """``FeCAM_vit_*.py`` written out: normalised features, np.cov, ``cov + mean(diag) I``, divided by ``s s^T``,
    ``pinv``; distances ``[N_test, C]``."""
    train, test = _normalize(train.astype(np.float64)), _normalize(test.astype(np.float64))
    distances = []
    for c in range(num_classes):
        members = train[labels == c]
        cov = np.cov(members.T)
        cov = cov + np.mean(np.diagonal(cov)) * np.eye(DIM)
        sd = np.sqrt(np.diagonal(cov))
        cov = cov / np.outer(sd, sd)
        diff = test - members.mean(0)
        distances.append(np.diagonal(diff @ np.linalg.pinv(cov) @ diff.T))
    return np.stack(distances, axis=1)


def _pilot_distances(train: np.ndarray, labels: np.ndarray, test: np.ndarray, num_classes: int) -> np.ndarray:
    """LAMDA-PILOT's ``models/fecam.py`` written out: raw statistics, ``corrcoef(cov + 100 I)``, both sides normalised
    in the distance."""
    train, test = train.astype(np.float64), test.astype(np.float64)
    distances = []
    for c in range(num_classes):
        members = train[labels == c]
        corr = np.corrcoef(np.cov(members.T) + 100 * np.eye(DIM))
        diff = _normalize(test) - _normalize(members.mean(0))
        distances.append(np.diagonal(diff @ np.linalg.pinv(corr) @ diff.T))
    return np.stack(distances, axis=1)


@pytest.mark.parametrize(
    ("kwargs", "reference"),
    [
        ({}, _authors_vit_distances),
        (
            {
                "features": "normalize_at_distance",
                "shrink": 100.0,
                "shrink_relative": False,
                "covariance_normalization": "row_correlation",
            },
            _pilot_distances,
        ),
    ],
    ids=["authors_vit", "pilot_port"],
)
def test_the_classifier_is_the_mahalanobis_distance_computed_from_scratch(
    kwargs: dict[str, Any], reference: Any
) -> None:
    tasks = empty_tasks(3, 2)
    feats = _anisotropic(tasks, per_class=40)
    method = _fecam(**kwargs)
    _learn(method, tasks, feats)
    train = torch.cat([feats[t.index][0] for t in tasks])
    labels = torch.cat([feats[t.index][1] for t in tasks])
    test = _anisotropic(tasks, per_class=10, seed=1)
    test_z = torch.cat([test[t.index][0] for t in tasks])
    expected = reference(train.numpy(), labels.numpy(), test_z.numpy(), 5)  # [N, C]
    logits = method.classify(test_z)
    np.testing.assert_allclose(-logits.numpy(), expected, rtol=1e-4, atol=1e-3)
    assert (logits.argmax(1).numpy() == expected.argmin(1)).all()


def test_tukey_transforms_features_before_the_statistics_and_refuses_signed_features() -> None:
    tasks = empty_tasks(2)
    z, labels = _anisotropic(tasks, per_class=30)[0]
    positive = z.abs() + 0.1
    method = _fecam(tukey_beta=0.5)
    _learn(method, tasks, {0: (positive, labels)})
    plain = _fecam()
    _learn(plain, tasks, {0: (positive.sqrt(), labels)})  # what Tukey's z^0.5 hands the statistics
    torch.testing.assert_close(method.classify(positive[:6]), plain.classify(positive[:6].sqrt()))
    with pytest.raises(ValueError, match="non-negative"):
        _learn(_fecam(tukey_beta=0.5), tasks, {0: (z, labels)})


def test_fecam_does_not_train_unless_asked_to_adapt() -> None:
    assert not _fecam().needs_fit(empty_tasks(2)[0])
    assert _fecam(adapt="adapter").needs_fit(empty_tasks(2)[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"features": "whiten"}, "features"), ({"covariance_normalization": "trace"}, "covariance_normalization")],
)
def test_bad_settings_are_refused_in_one_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _fecam(**kwargs)


def test_distances_are_float32_arithmetic_under_bf16_autocast() -> None:
    tasks = empty_tasks(3)
    method = _fecam()
    _learn(method, tasks, _anisotropic(tasks, per_class=40))
    z = torch.randn(5, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = method.classify(z)
    diff = F.normalize(z.double(), dim=-1)[:, None] - method.head.means.double()[None]  # [5, C, D], by hand
    expected = -torch.einsum("bcd,cde,bce->bc", diff, method.head.precisions.double(), diff)
    torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=1e-3)
