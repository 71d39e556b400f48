"""Metrics against hand-computed accuracy matrices (expected values are worked out in the tests, not recomputed)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from cil import metrics

nan = float("nan")

# The worked example of the module docstring: 3 tasks, 100 test images each, NaN upper triangle (class-incremental).
R3 = np.array(
    [
        [90.0, nan, nan],
        [70.0, 80.0, nan],
        [60.0, 75.0, 85.0],
    ]
)


# --- the docstring's worked example ----------------------------------------------------------------------------


def test_seen_accuracy_of_worked_example() -> None:
    # step 0: 90; step 1: (70 + 80) / 2 = 75; step 2: (60 + 75 + 85) / 3 = 220 / 3 = 73.333...
    np.testing.assert_allclose(metrics.seen_accuracy(R3), [90.0, 75.0, 73.33333333333333])
    assert metrics.seen_accuracy(R3).shape == (3,)


def test_avg_incremental_acc_of_worked_example() -> None:
    # (90 + 75 + 73.333...) / 3 = 238.333... / 3 = 79.444...
    assert metrics.avg_incremental_acc(R3) == pytest.approx(79.44444444444444)
    assert round(metrics.avg_incremental_acc(R3), 2) == 79.44
    assert isinstance(metrics.avg_incremental_acc(R3), float)


def test_last_acc_of_worked_example() -> None:
    assert metrics.last_acc(R3) == pytest.approx(73.33333333333333)
    assert isinstance(metrics.last_acc(R3), float)


def test_avg_forgetting_of_worked_example() -> None:
    # Chaudhry: max over the steps before the last, minus the last step.
    # task 0: max(90, 70) - 60 = 30; task 1: max(80) - 75 = 5; mean (30 + 5) / 2 = 17.5.
    np.testing.assert_allclose(metrics.forgetting_per_task(R3), [30.0, 5.0])
    assert metrics.avg_forgetting(R3) == pytest.approx(17.5)


def test_bwt_of_worked_example() -> None:
    # ((60 - 90) + (75 - 80)) / 2 = (-30 - 5) / 2 = -17.5
    assert metrics.bwt(R3) == pytest.approx(-17.5)


def test_old_new_accuracy_of_worked_example() -> None:
    old, new = metrics.old_new_accuracy(R3)
    # old: step 0 has no old tasks (NaN); step 1: 70; step 2: (60 + 75) / 2 = 67.5.  new: the diagonal.
    assert math.isnan(old[0])
    np.testing.assert_allclose(old[1:], [70.0, 67.5])
    np.testing.assert_allclose(new, [90.0, 80.0, 85.0])


def test_old_new_accuracy_weighted_and_new_is_a_copy() -> None:
    matrix = R3.copy()
    old, new = metrics.old_new_accuracy(matrix, n_test=[100, 300, 50])
    # step 2 old: (60 * 100 + 75 * 300) / 400 = (6000 + 22500) / 400 = 71.25
    np.testing.assert_allclose(old[1:], [70.0, 71.25])
    new[0] = -1.0
    assert matrix[0, 0] == 90.0  # the diagonal is returned as a copy


# --- weighting -------------------------------------------------------------------------------------------------


def test_seen_accuracy_weights_by_test_set_size() -> None:
    n_test = [100, 300, 50]
    # step 0: 90
    # step 1: (70 * 100 + 80 * 300) / 400 = (7000 + 24000) / 400 = 77.5
    # step 2: (60 * 100 + 75 * 300 + 85 * 50) / 450 = (6000 + 22500 + 4250) / 450 = 32750 / 450 = 72.777...
    np.testing.assert_allclose(metrics.seen_accuracy(R3, n_test=n_test), [90.0, 77.5, 72.77777777777777])
    assert metrics.last_acc(R3, n_test=n_test) == pytest.approx(72.77777777777777)
    # (90 + 77.5 + 72.777...) / 3 = 240.2777... / 3 = 80.0925925...
    assert metrics.avg_incremental_acc(R3, n_test=n_test) == pytest.approx(80.09259259259258)


def test_equal_test_sizes_match_the_unweighted_row_mean() -> None:
    np.testing.assert_allclose(metrics.seen_accuracy(R3, n_test=[7, 7, 7]), [90.0, 75.0, 73.33333333333333])


# --- forgetting ------------------------------------------------------------------------------------------------


def test_forgetting_is_negative_when_an_old_task_improves() -> None:
    improved = np.array([[50.0, nan], [70.0, 90.0]])
    # Chaudhry et al.: max over the steps before the last -> 50 - 70 = -20
    np.testing.assert_allclose(metrics.forgetting_per_task(improved), [-20.0])
    assert metrics.avg_forgetting(improved) == pytest.approx(-20.0)
    # PILOT takes the max over all steps including the last, so every entry below would be 0 there. Each old task
    # here rises at every step after it was learned:
    rising = np.array([[50.0, nan, nan], [60.0, 80.0, nan], [70.0, 85.0, 90.0]])
    # step 2: task 0: max(50, 60) - 70 = -10; task 1: max(80) - 85 = -5; mean -7.5
    np.testing.assert_allclose(metrics.forgetting_per_task(rising), [-10.0, -5.0])
    assert metrics.avg_forgetting(rising) == pytest.approx(-7.5)
    # step 1: task 0: max(50) - 60 = -10
    np.testing.assert_allclose(metrics.forgetting_per_task(rising, step=1), [-10.0])


def test_forgetting_takes_the_max_over_earlier_steps_not_the_diagonal() -> None:
    # task 0 peaks at step 1 (95), not when it was learned (90)
    matrix = np.array([[90.0, nan, nan], [95.0, 80.0, nan], [60.0, 70.0, 85.0]])
    # task 0: max(90, 95) - 60 = 35; task 1: max(80) - 70 = 10; mean 22.5
    np.testing.assert_allclose(metrics.forgetting_per_task(matrix), [35.0, 10.0])
    assert metrics.avg_forgetting(matrix) == pytest.approx(22.5)
    # BWT compares with the diagonal instead: ((60 - 90) + (70 - 80)) / 2 = -20
    assert metrics.bwt(matrix) == pytest.approx(-20.0)


def test_forgetting_per_task_at_an_intermediate_step() -> None:
    # step 1: only task 0 is old; max(R[0, 0]) - R[1, 0] = 90 - 70 = 20
    np.testing.assert_allclose(metrics.forgetting_per_task(R3, step=1), [20.0])
    # step 2 (explicit) equals the default (last step)
    np.testing.assert_allclose(metrics.forgetting_per_task(R3, step=2), [30.0, 5.0])
    # step 0 has no old tasks
    assert metrics.forgetting_per_task(R3, step=0).shape == (0,)


@pytest.mark.parametrize("step", [3, -1])
def test_forgetting_per_task_rejects_steps_outside_the_stream(step: int) -> None:
    with pytest.raises(ValueError, match=f"step {step} is outside the stream's 3 tasks"):
        metrics.forgetting_per_task(R3, step=step)


# --- forward transfer and one-task streams ---------------------------------------------------------------------


def test_fwt_is_nan_for_class_incremental_matrices() -> None:
    assert math.isnan(metrics.fwt(R3, baseline=[10.0, 10.0, 10.0]))


def test_fwt_hand_value() -> None:
    full = np.array([[90.0, 30.0, 20.0], [70.0, 80.0, 40.0], [60.0, 75.0, 85.0]])
    # j = 1: R[0, 1] - b[1] = 30 - 12 = 18; j = 2: R[1, 2] - b[2] = 40 - 4 = 36; mean 27.  b[0] is unused.
    assert metrics.fwt(full, baseline=[99.0, 12.0, 4.0]) == pytest.approx(27.0)


def test_fwt_rejects_a_baseline_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="baseline must have one entry per task"):
        metrics.fwt(R3, baseline=[10.0, 10.0])


def test_one_task_stream() -> None:
    single = np.array([[88.0]])
    assert math.isnan(metrics.bwt(single))
    assert math.isnan(metrics.fwt(single, baseline=[0.0]))
    assert math.isnan(metrics.avg_forgetting(single))
    assert metrics.forgetting_per_task(single).shape == (0,)
    assert metrics.last_acc(single) == 88.0
    assert metrics.avg_incremental_acc(single) == 88.0


# --- validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "function",
    [
        metrics.seen_accuracy,
        metrics.avg_incremental_acc,
        metrics.last_acc,
        metrics.forgetting_per_task,
        metrics.avg_forgetting,
        metrics.bwt,
        metrics.old_new_accuracy,
    ],
)
def test_non_square_matrices_are_rejected(function: Callable[[Any], Any]) -> None:
    with pytest.raises(ValueError, match=r"must be square \(T x T\), got shape \(2, 3\)"):
        function(np.zeros((2, 3)))


def test_one_dimensional_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be square"):
        metrics.seen_accuracy([90.0, 80.0])
    with pytest.raises(ValueError, match="must be square"):
        metrics.fwt(np.zeros((3, 2)), baseline=[0.0, 0.0, 0.0])


@pytest.mark.parametrize("n_test", [[1, 2], [1, 2, 3, 4], [[1, 2, 3]]])
def test_n_test_of_the_wrong_length_is_rejected(n_test: list[Any]) -> None:
    with pytest.raises(ValueError, match=r"n_test must have one entry per task \(3\)"):
        metrics.seen_accuracy(R3, n_test=n_test)
    with pytest.raises(ValueError, match="n_test must have one entry per task"):
        metrics.old_new_accuracy(R3, n_test=n_test)


# --- TaskAccuracy ----------------------------------------------------------------------------------------------


def test_task_accuracy_with_logits_and_mixed_tasks() -> None:
    metric = metrics.TaskAccuracy(num_tasks=3)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 2.0, 0.0]])
    # argmax: 0, 1, 0, 2, 1
    target = torch.tensor([0, 0, 0, 2, 1])
    task_ids = torch.tensor([0, 0, 1, 1, 1])
    metric.update(logits, target, task_ids)
    state = metric.compute()
    # task 0: samples 0 (hit), 1 (miss); task 1: samples 2 (hit), 3 (hit), 4 (hit); task 2: nothing
    assert state["correct"].tolist() == [1, 3, 0]
    assert state["total"].tolist() == [2, 3, 0]
    accuracy = metric.accuracy()
    assert accuracy.shape == (3,)
    assert accuracy[0].item() == pytest.approx(50.0)
    assert accuracy[1].item() == pytest.approx(100.0)
    assert math.isnan(accuracy[2].item())


def test_task_accuracy_accepts_label_predictions_and_accumulates() -> None:
    metric = metrics.TaskAccuracy(num_tasks=2)
    metric.update(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]), torch.tensor([0, 1, 1]))  # [B] labels
    metric.update(torch.tensor([[0.1, 0.9], [0.9, 0.1]]), torch.tensor([1, 1]), torch.tensor([1, 0]))  # [B, C]
    # task 0: (1 vs 1 hit), (0 vs 1 miss) -> 1 / 2; task 1: (0 vs 1 miss), (1 vs 1 hit), (1 vs 1 hit) -> 2 / 3
    assert metric.compute()["correct"].tolist() == [1, 2]
    assert metric.compute()["total"].tolist() == [2, 3]
    np.testing.assert_allclose(metric.accuracy().numpy(), [50.0, 200.0 / 3.0])


def test_task_accuracy_reset() -> None:
    metric = metrics.TaskAccuracy(num_tasks=2)
    metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    np.testing.assert_allclose(metric.accuracy().numpy(), [100.0, 100.0])
    metric.reset()
    assert metric.correct.tolist() == [0, 0] and metric.total.tolist() == [0, 0]
    assert torch.isnan(metric.accuracy()).all()
    metric.update(torch.tensor([1]), torch.tensor([0]), torch.tensor([1]))  # usable again after reset
    assert metric.compute()["correct"].tolist() == [0, 0]
    assert metric.compute()["total"].tolist() == [0, 1]
    assert metric.accuracy()[1].item() == 0.0
