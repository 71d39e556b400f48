"""Scoring tasks before they are trained (cil.transfer): the zero-shot baseline, R's upper triangle, FWT and MTIL's
Transfer / Average / Last, with a tiny random CLIP (CoDyRA's class-name head) on the tiny stream."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cil import metrics, plots
from cil.backbones import Backbone
from cil.cli import main
from cil.data import Transformed, build_transform
from cil.engine import Engine
from cil.method import create_method
from cil.results import load_runs
from cil.stream import Stream, build_stream
from streams.nevis import TaskSpec
from tests.conftest import TINY_DATA, cpu_trainers, tiny_backbone, tiny_stream
from tests.test_codyra import tiny_clip


def _codyra(backbone: Backbone) -> Any:
    return create_method("codyra", backbone, steps=4, lr=3e-3, rank=4, kappa_max=0.05)


def _run(out: Path, backbone: Backbone, stream: Stream, **engine: Any) -> Engine:
    runner = Engine(_codyra(backbone), stream, out, trainer_factory=cpu_trainers(out), data=TINY_DATA, seed=3, **engine)
    runner.run()
    return runner


@torch.no_grad()
def _zero_shot_accuracy(backbone: Backbone, stream: Stream, candidates: str) -> list[float]:
    """Each task's accuracy under the untrained CLIP, computed here from scratch: image embeddings against the text
    embeddings of "a photo of a {name}.", among the task's own classes or among every class of the stream."""
    clip = backbone.clip  # type: ignore[attr-defined]
    clip.eval()
    transform = build_transform(backbone.input_size, backbone.mean, backbone.std, train=False)
    names = [name for task in stream for name in task.class_names]
    tokens = backbone.tokenizer([f"a photo of a {n}." for n in names], context_length=clip.context_length)  # type: ignore[attr-defined]
    text = torch.nn.functional.normalize(clip.encode_text(tokens), dim=-1)  # [C, E]
    accuracies = []
    for task in stream:
        images, labels = zip(*Transformed(task.test, transform), strict=True)
        image = torch.nn.functional.normalize(clip.encode_image(torch.stack(images)), dim=-1)  # [N, E]
        scores = image @ text.T  # [N, C]
        if candidates == "task":
            first, last = task.classes[0], task.classes[-1] + 1
            predicted = scores[:, first:last].argmax(dim=1) + first
        else:
            predicted = scores.argmax(dim=1)
        accuracies.append(100.0 * float((predicted == torch.tensor(labels)).float().mean()))
    return accuracies


def test_mtil_run_fills_the_upper_triangle_and_measures_the_zero_shot_baseline(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = tiny_clip()
    untrained = copy.deepcopy(backbone)
    stream = tiny_stream(increment=5)
    retention = tiny_stream(seed=1, increment=10, train_per_class=3, test_per_class=3)
    engine = Engine(
        _codyra(backbone),
        stream,
        tmp_path,
        trainer_factory=cpu_trainers(tmp_path),
        data=TINY_DATA,
        seed=3,
        protocol="task_incremental",
        evaluate_future=True,
        retention=retention,
    )
    probes = iter([11.0, 22.0, 33.0])  # before the stream, after task 0, after task 1: told apart by value
    engine._retention = lambda trainer: next(probes)  # type: ignore[method-assign]
    engine.run()

    R = engine.accuracy_matrix()
    assert not np.isnan(R).any()  # every task after every step, trained or not
    results = pd.read_csv(tmp_path / "results.csv")
    before = results[results["train_task"] == -1]
    assert list(before["eval_task"]) == [0, 1] and set(before["train_task_name"]) == {"(pre-trained)"}
    expected = _zero_shot_accuracy(untrained, stream, candidates="task")
    np.testing.assert_allclose(before["accuracy"], expected, atol=1e-4)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["zero_shot_baseline"] == pytest.approx(expected, abs=1e-4)
    # the baseline rows carry the pre-trained model's retention, the others the retention after their step
    assert before["retention_acc"].tolist() == [11.0, 11.0]
    after = results[results["train_task"] >= 0]
    assert after.groupby("train_task")["retention_acc"].agg(set).tolist() == [{22.0}, {33.0}]
    assert summary["fwt"] == pytest.approx(R[0, 1] - expected[1], abs=1e-3)
    assert summary["mtil_transfer"] == pytest.approx(R[0, 1], abs=1e-3)  # two tasks: one entry above the diagonal
    assert summary["mtil_average"] == pytest.approx(R.mean(), abs=1e-3)
    assert summary["mtil_last"] == pytest.approx(R[1].mean(), abs=1e-3)
    assert summary["mtil_transfer_per_task"][0] is None
    assert summary["avg_forgetting"] == pytest.approx(R[0, 0] - R[1, 0], abs=1e-3)  # not from before training
    per_step = plots.seen_accuracy_per_step(load_runs([tmp_path]))  # the curves leave the future and baseline out
    np.testing.assert_allclose(per_step["seen_accuracy"], summary["seen_accuracy"], atol=1e-3)
    costs = pd.read_csv(tmp_path / "tasks.csv")
    assert costs["future_eval_s"][0] > 0 and costs["future_eval_s"][1] == 0  # the last task has no future
    np.testing.assert_allclose(costs["wall_s"], costs["fit_s"] + costs["eval_s"], atol=0.002)  # the run's own cost
    assert summary["future_eval_s"] == pytest.approx(costs["future_eval_s"].sum(), abs=0.01)
    assert (summary["label_space"], summary["evaluate_future"]) == ("seen", True)


def test_scoring_the_future_leaves_training_and_the_lower_triangle_unchanged(tmp_path: Path) -> None:
    stream = tiny_stream(increment=5)
    torch.manual_seed(0)
    with_future = _run(tmp_path / "future", tiny_clip(), stream, protocol="task_incremental", evaluate_future=True)
    torch.manual_seed(0)
    plain = _run(tmp_path / "plain", tiny_clip(), stream, protocol="task_incremental")
    lower = np.tril(np.ones((2, 2), dtype=bool))
    np.testing.assert_array_equal(with_future.accuracy_matrix()[lower], plain.accuracy_matrix()[lower])
    assert np.isnan(plain.accuracy_matrix()[0, 1])
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["fwt"] is None


def test_the_stream_label_space_scores_every_image_among_every_class(tmp_path: Path) -> None:
    """X-TAIL: seen and future tasks among all the stream's classes; no image can be right among all classes and
    wrong among its own task's, so the baseline is at most the per-task one."""
    torch.manual_seed(0)
    backbone = tiny_clip()
    untrained = copy.deepcopy(backbone)
    stream = tiny_stream(increment=5)
    engine = _run(tmp_path, backbone, stream, label_space="stream", evaluate_future=True)
    assert not np.isnan(engine.accuracy_matrix()).any()
    before = pd.read_csv(tmp_path / "results.csv").query("train_task == -1")["accuracy"].to_numpy()
    np.testing.assert_allclose(before, _zero_shot_accuracy(untrained, stream, candidates="stream"), atol=1e-4)
    per_task = _zero_shot_accuracy(untrained, stream, candidates="task")
    assert (before <= np.asarray(per_task) + 1e-6).all()
    # after task 0, its images were scored among all 10 classes, not among the 5 seen ones
    state = torch.load(tmp_path / "checkpoints" / "task_000.ckpt", weights_only=True)
    restored = _codyra(tiny_clip())
    restored.load_cil_state(state["method"], stream.tasks)
    restored.eval()
    transform = build_transform(backbone.input_size, backbone.mean, backbone.std, train=False)
    images, labels = zip(*Transformed(stream[0].test, transform), strict=True)
    with torch.no_grad():
        logits = restored.zero_shot_classifier(stream.label_tasks)(restored.embed(torch.stack(images)))
    among_all = 100.0 * float((logits.argmax(1) == torch.tensor(labels)).float().mean())
    among_seen = 100.0 * float((logits[:, :5].argmax(1) == torch.tensor(labels)).float().mean())
    assert among_all != among_seen  # else this check could not tell the label spaces apart
    assert engine.accuracy_matrix()[0, 0] == pytest.approx(among_all, abs=1e-4)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (config["label_space"], config["evaluate_future"]) == ("stream", True)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("simplecil", {"evaluate_future": True}, "has no outputs for classes it has not trained on"),
        ("codyra", {"label_space": "stream"}, "cannot (codyra can, with an open_clip backbone)"),
        ("clip", {"evaluate_future": True}, "use protocol task_incremental (MTIL"),
        ("clip", {"label_space": "stream", "protocol": "task_incremental"}, "use protocol class_incremental"),
        ("clip", {"label_space": "everything"}, "label_space must be one of"),
    ],
)
def test_settings_whose_numbers_would_mean_something_else_are_refused(
    tmp_path: Path, method: str, options: dict[str, Any], message: str
) -> None:
    built = _codyra(tiny_clip()) if method == "clip" else create_method(method, tiny_backbone())
    with pytest.raises(ValueError, match=re.escape(message)):
        Engine(built, tiny_stream(increment=5), tmp_path, **options)
    assert not any(tmp_path.iterdir())


def test_mtil_metrics_of_a_hand_computed_matrix() -> None:
    R = np.array([[90.0, 40.0, 30.0], [70.0, 80.0, 35.0], [60.0, 75.0, 85.0]])
    np.testing.assert_allclose(metrics.mtil_transfer_per_task(R), [np.nan, 40.0, 32.5])
    assert metrics.mtil_transfer(R) == pytest.approx((40.0 + 32.5) / 2)
    np.testing.assert_allclose(metrics.mtil_average_per_task(R), [220 / 3, 65.0, 50.0])
    assert metrics.mtil_average(R) == pytest.approx(565 / 9)
    np.testing.assert_allclose(metrics.mtil_last_per_task(R), [60.0, 75.0, 85.0])
    assert metrics.mtil_last(R) == pytest.approx(220 / 3)
    # forgetting counts only steps from a task's own on: a score from before task 1 was trained was never learned
    raised = R.copy()
    raised[0, 1] = 95.0
    np.testing.assert_allclose(metrics.forgetting_per_task(raised), [30.0, 5.0])
    assert metrics.fwt(R, baseline=[50.0, 30.0, 20.0]) == pytest.approx(((40 - 30) + (35 - 20)) / 2)
    lower = np.where(np.tril(np.ones((3, 3), dtype=bool)), R, np.nan)
    assert np.isnan(metrics.mtil_transfer(lower)) and np.isnan(metrics.mtil_average(lower))
    assert metrics.mtil_last(lower) == pytest.approx(220 / 3)


def _with_prompts(stream: Stream, prompts: list[str | None]) -> Stream:
    tasks = [
        dataclasses.replace(task, metadata={**task.metadata, **({"prompt": prompt} if prompt else {})})
        for task, prompt in zip(stream, prompts, strict=True)
    ]
    return Stream(stream.name, tuple(tasks), stream.metadata, stream.scenario)


def test_classes_with_the_same_prompt_are_refused_under_the_stream_label_space(tmp_path: Path) -> None:
    """UCI digits and MNIST both name their classes 0-9: among all 20, a tie always goes to the first task's."""
    digits = build_stream({"name": "nevis_offline", "stop_year": 1999, "train_per_class": 2, "test_per_class": 2})
    method = _codyra(tiny_clip())
    clash = r"10 classes have the prompt of an earlier one \('0' of mnist_1998 and of uci_optical"
    with pytest.raises(ValueError, match=clash):
        Engine(method, digits, tmp_path, label_space="stream")
    Engine(method, digits, tmp_path, protocol="task_incremental", evaluate_future=True)  # each among its own: fine
    distinct = _with_prompts(digits, [None, 'a photo of the number: "{}".'])
    Engine(method, distinct, tmp_path, label_space="stream")
    assert not any(tmp_path.iterdir())


def test_a_task_s_own_prompt_reaches_the_class_name_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stream = _with_prompts(tiny_stream(increment=5), ["a sketch of the digit {}.", None])
    method = _codyra(tiny_clip())
    first, second = stream.tasks
    expected = [f"a sketch of the digit {d}." for d in first.class_names]
    expected += [f"a photo of a {d}." for d in second.class_names]
    assert method.zero_shot_prompts(stream.tasks) == expected
    Engine(method, stream, tmp_path, trainer_factory=cpu_trainers(tmp_path, max_steps=1), data=TINY_DATA).run()
    assert method.head.prompts == expected  # type: ignore[union-attr]
    with torch.no_grad():
        torch.testing.assert_close(method.head.text, method.head.encode(expected), rtol=1e-5, atol=1e-5)  # type: ignore[union-attr, operator]


def test_per_task_table_of_an_mtil_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    _run(tmp_path / "run", tiny_clip(), tiny_stream(increment=5), protocol="task_incremental", evaluate_future=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    metrics_ = ["mtil_transfer", "mtil_average", "mtil_last"]
    assert main(["table", str(tmp_path / "run"), "--per-task", "--metrics", *metrics_, "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index(["task", "metric"])["mean"]
    for metric in metrics_:
        per_task = summary[f"{metric}_per_task"]
        for name, value in zip(summary["task_names"], per_task, strict=True):
            assert table[(name, metric)] == pytest.approx(np.nan if value is None else value, nan_ok=True)
        assert table[("Average", metric)] == pytest.approx(summary[metric])
    assert main(["table", str(tmp_path / "run"), "--per-task", "--format", "csv"]) == 0  # default: final accuracy
    final = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index("task")["mean"]
    assert final[summary["task_names"]].tolist() == pytest.approx(summary["final_task_scores"])
    assert main(["table", str(tmp_path / "run"), "--per-task", "--metrics", "avg_incremental_acc"]) == 1
    assert "has one value per run: drop --per-task" in capsys.readouterr().err


def test_a_stream_task_prompt_needs_one_slot_for_the_class_name() -> None:
    task = {"dataset": "digits", "root": "digits", "prompt": "a photo of a digit."}
    with pytest.raises(ValueError, match=r"stream.tasks\[0\]: prompt must hold one \{\} for the class name"):
        TaskSpec.parse(task, "stream.tasks[0]")
    assert TaskSpec.parse({**task, "prompt": "a photo of the digit {}."}, "t").prompt == "a photo of the digit {}."
