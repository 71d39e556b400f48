"""RanPAC: the incremental ridge readout is a batch ridge regression on everything seen; lambda's choice; the head."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cil.ridge import RandomProjectionRidge, select_ridge
from cil.task import Task
from methods.ranpac import RanPAC
from tests.conftest import empty_tasks, tiny_backbone


def _features(
    tasks: list[Task], dim: int, per_class: int, seed: int = 0
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per task: embeddings ``[N, dim]`` around a centre per class, and labels ``[N]``."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for task in tasks:
        labels = torch.tensor(task.classes).repeat_interleave(per_class)
        centres = torch.randn(len(task.classes), dim, generator=generator)
        z = centres.repeat_interleave(per_class, 0) + 0.3 * torch.randn(len(labels), dim, generator=generator)
        out[task.index] = (z, labels)
    return out


def _run(method: RanPAC, tasks: list[Task], feats: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for task in tasks:
        method.begin_task(task)
        method.after_task(task, lambda _data, t=task.index: feats[t])


def _ranpac(**kwargs: Any) -> RanPAC:
    torch.manual_seed(0)
    return RanPAC(tiny_backbone(), **{"adapt": "none", "projection_dim": 48, "precision": "float64", **kwargs})


def test_the_incremental_readout_is_a_batch_ridge_regression_on_all_seen_images() -> None:
    tasks = empty_tasks(3, 2, 4)
    method = _ranpac(ridge=0.5)
    feats = _features(tasks, method.backbone.num_features, per_class=7)
    _run(method, tasks, feats)
    z = torch.cat([feats[t.index][0] for t in tasks]).double()  # [N, D], every image seen
    y = F.one_hot(torch.cat([feats[t.index][1] for t in tasks]), 9).double()  # [N, C]
    h = torch.relu(z @ method.head.projection.double())  # [N, M]
    batch = np.linalg.solve(h.T.numpy() @ h.numpy() + 0.5 * np.eye(48), h.T.numpy() @ y.numpy()).T  # [C, M]
    np.testing.assert_allclose(method.head.readout.numpy(), batch, rtol=1e-5, atol=1e-8)
    logits = method.classify(z[:5].float())
    np.testing.assert_allclose(logits.numpy(), (h[:5].numpy() @ batch.T).astype(np.float32), rtol=1e-4, atol=1e-5)


def test_lambda_is_the_candidate_with_the_lowest_held_out_error_of_a_fit_on_the_first_80_percent() -> None:
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(50, 12, generator=generator, dtype=torch.float64)
    targets = F.one_hot(torch.randint(0, 3, (50,), generator=generator), 3).double()
    ridges = [1e-3, 1e-1, 1e1, 1e3]
    errors = []
    for ridge in ridges:  # by hand: fit on rows 0..39, score on 40..49
        readout = np.linalg.solve(
            h[:40].T.numpy() @ h[:40].numpy() + ridge * np.eye(12), h[:40].T.numpy() @ targets[:40].numpy()
        )
        errors.append(((h[40:].numpy() @ readout - targets[40:].numpy()) ** 2).mean())
    assert select_ridge(h, targets, ridges) == ridges[int(np.argmin(errors))]
    # pure-noise targets: the readout that predicts ~0 (the largest ridge) wins; a noiseless linear map: the smallest
    assert select_ridge(h, targets - targets.mean(0), ridges) == 1e3
    exact = h @ torch.randn(12, 3, generator=generator, dtype=torch.float64)
    assert select_ridge(h, exact, ridges) == 1e-3


def test_the_method_chooses_lambda_per_task_and_records_it() -> None:
    tasks = empty_tasks(3, 3)
    method = _ranpac(ridges=[1e-6, 1e6])
    feats = _features(tasks, method.backbone.num_features, per_class=10)
    method.begin_task(tasks[0])
    method.after_task(tasks[0], lambda _data: feats[0])
    assert method.task_info["ridge"] == 1e-6  # separable classes: the tiny ridge fits, the huge one predicts ~0
    torch.testing.assert_close(  # and the readout solves the full G with it
        method.head.readout.T,
        torch.linalg.solve(method.head.gram + 1e-6 * torch.eye(48, dtype=torch.float64), method.head.moments),
    )


def test_cosine_readout_and_no_projection() -> None:
    tasks = empty_tasks(2)
    feats = _features(tasks, 32, per_class=6)
    cosine, linear = _ranpac(ridge=1.0, readout="cosine"), _ranpac(ridge=1.0)
    torch.manual_seed(5)
    _run(cosine, tasks, feats)
    torch.manual_seed(5)  # the same projection
    _run(linear, tasks, feats)
    z = feats[0][0][:4]
    h = torch.relu(z.double() @ cosine.head.projection.double())
    expected = F.normalize(h, dim=1) @ F.normalize(cosine.head.readout, dim=1).T
    torch.testing.assert_close(cosine.classify(z), expected.float())
    torch.testing.assert_close(linear.classify(z), (h @ cosine.head.readout.T).float())  # same P: same readout
    plain = _ranpac(ridge=1.0, projection_dim=0)  # M = 0: the readout is a ridge regression on z itself
    _run(plain, tasks, feats)
    assert plain.head.gram.shape == (32, 32)
    torch.testing.assert_close(plain.head.gram, feats[0][0].double().T @ feats[0][0].double())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "float16"}, "precision"),
        ({"readout": "softmax"}, "readout"),
        ({"projection_dim": -1}, "projection_dim"),
        ({"fit_fraction": 1.0}, "fit_fraction"),
        ({"adapt": "lora"}, "adapt"),
    ],
)
def test_bad_settings_are_refused_in_one_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _ranpac(**kwargs)


def test_the_readout_after_a_checkpoint_round_trip_is_the_same() -> None:
    tasks = empty_tasks(2, 2)
    method = _ranpac(ridge=0.1)
    _run(method, tasks, _features(tasks, 32, per_class=5))
    restored = _ranpac(ridge=0.1)
    restored.load_cil_state(method.cil_state(), tasks)
    z = torch.randn(3, 32)
    torch.testing.assert_close(restored.classify(z), method.classify(z))
    assert restored.head.gram.dtype == torch.float64


def test_random_projection_ridge_accumulates_sums_of_its_own_features() -> None:
    head = RandomProjectionRidge(4, 6, dtype=torch.float64)
    head.draw(torch.Generator().manual_seed(0))
    head.expand(2)
    z, labels = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    h = head.accumulate(z, labels)
    torch.testing.assert_close(h, torch.relu(z.double() @ head.projection.double()))
    torch.testing.assert_close(head.gram, h.T @ h)
    torch.testing.assert_close(head.moments, h.T @ F.one_hot(labels, 2).double())


def test_scores_are_float32_arithmetic_under_bf16_autocast() -> None:
    head = RandomProjectionRidge(8, 512)
    head.draw(torch.Generator().manual_seed(0))
    head.expand(3)
    head.readout.normal_()
    z = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = head(z)
    expected = torch.relu(z.double() @ head.projection.double()) @ head.readout.double().T  # by hand, float64
    torch.testing.assert_close(scores, expected.float(), rtol=1e-5, atol=1e-4)
