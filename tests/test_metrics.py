"""Metrics against hand-computed accuracy matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cil import metrics

nan = float("nan")
R3 = np.array([[90.0, nan, nan], [70.0, 80.0, nan], [60.0, 75.0, 85.0]])


def test_worked_example_from_the_docstring() -> None:
    np.testing.assert_allclose(metrics.seen_accuracy(R3), [90.0, 75.0, (60 + 75 + 85) / 3])
    assert metrics.avg_incremental_acc(R3) == pytest.approx((90 + 75 + 220 / 3) / 3)
    assert metrics.last_acc(R3) == pytest.approx(220 / 3)
    assert metrics.avg_forgetting(R3) == pytest.approx(((90 - 60) + (80 - 75)) / 2)
    assert metrics.bwt(R3) == pytest.approx(((60 - 90) + (75 - 80)) / 2)
    old, new = metrics.old_new_accuracy(R3)
    np.testing.assert_allclose(old, [nan, 70.0, 67.5])
    np.testing.assert_allclose(new, [90.0, 80.0, 85.0])


def test_seen_accuracy_weights_by_test_set_size() -> None:
    # step 1: task 0 (100 images) at 70 %, task 1 (300 images) at 80 % -> (70 + 240) / 400
    np.testing.assert_allclose(metrics.seen_accuracy(R3, n_test=[100, 300, 100])[1], 310 / 4)


def test_forgetting_is_negative_when_old_tasks_improve() -> None:
    improved = np.array([[50.0, nan], [70.0, 90.0]])
    assert metrics.avg_forgetting(improved) == pytest.approx(-20.0)  # Chaudhry: max over steps before the last
    pilot_style = np.nanmax(improved[:, 0]) - improved[-1, 0]  # PILOT: max over all steps -> never negative
    assert pilot_style == 0.0
    np.testing.assert_allclose(metrics.forgetting_per_task(R3, step=1), [20.0])


def test_fwt_and_one_task_streams() -> None:
    assert math.isnan(metrics.fwt(R3, baseline=[10.0, 10.0, 10.0]))  # class-incremental: upper triangle is NaN
    full = np.array([[90.0, 30.0, 20.0], [70.0, 80.0, 40.0], [60.0, 75.0, 85.0]])
    assert metrics.fwt(full, baseline=[10.0, 10.0, 10.0]) == pytest.approx(((30 - 10) + (40 - 10)) / 2)
    single = np.array([[88.0]])
    assert math.isnan(metrics.bwt(single)) and math.isnan(metrics.avg_forgetting(single))
    assert math.isnan(metrics.fwt(single, baseline=[0.0]))
    assert metrics.last_acc(single) == 88.0


def test_validation() -> None:
    with pytest.raises(ValueError, match="square"):
        metrics.seen_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="n_test"):
        metrics.seen_accuracy(R3, n_test=[1, 2])


def test_task_accuracy_metric_with_mixed_batches() -> None:
    metric = metrics.TaskAccuracy(num_tasks=3)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])  # predicts 0, 1, 0, 0
    metric.update(logits, torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1]))
    metric.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([1]))  # labels as predictions
    state = metric.compute()
    assert state["correct"].tolist() == [1, 2, 0] and state["total"].tolist() == [2, 3, 0]
    accuracy = metric.accuracy()
    assert accuracy[0].item() == pytest.approx(50.0) and accuracy[1].item() == pytest.approx(200 / 3)
    assert math.isnan(accuracy[2].item())
    metric.reset()
    assert metric.compute()["total"].sum().item() == 0
