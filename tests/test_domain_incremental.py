"""Domain-incremental streams through the engine: methods that cannot learn new images of old classes are refused,
the head grows at the first domain only, SimpleCIL's prototypes average every domain so far, and ``evaluate_future``
fills R's upper triangle from the head, so MTIL's metrics are defined while FWT (no zero-shot baseline) is not.

Runs use the ``digits_domains`` stream at 8 training / 5 test images per class and domain (80 / 50 per task) and the
tiny random ViT; each fit is one epoch of 3 batches."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import ConcatDataset, Dataset

from cil.backbones import Backbone
from cil.data import Transformed, build_transform
from cil.engine import Engine
from cil.heads import PrototypeHead
from cil.method import CILMethod, create_method, list_methods, method_class
from cil.results import load_summaries
from cil.stream import Stream, build_stream
from tests.conftest import TINY_DATA, crash_during, run_engine, tiny_backbone

# The tiny ViT is random: AdamW moves it in a few steps, SGD at the pre-trained learning rate barely does.
FROM_SCRATCH: dict[str, Any] = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0}
TRAINERS = ["finetune", "er"]
# Three steps per domain leave both near chance (10%). With these initial weights each scores domain 1 higher before
# training on it than after (R[0, 1] > R[1, 1]), so the forgetting check tells the upper triangle apart from the
# scores of trained domains; other seeds can give a matrix that does not.
INIT_SEED = {"finetune": 5, "er": 1}
SUPPORTING = [n for n in list_methods() if "domain_incremental" in method_class(n).supported_scenarios]
REFUSING = [n for n in list_methods() if "domain_incremental" not in method_class(n).supported_scenarios]


def digits(**options: Any) -> Stream:
    return build_stream({"name": "digits_domains", "train_per_class": 8, "test_per_class": 5, **options}, seed=0)


@pytest.fixture(scope="module")
def stream() -> Stream:
    return digits()


def trainer(name: str) -> CILMethod:
    torch.manual_seed(INIT_SEED[name])  # the same random backbone and head in every run of the method
    return create_method(name, tiny_backbone(), **FROM_SCRATCH)


@pytest.fixture(scope="module")
def future_runs(stream: Stream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Engine]]:
    """finetune and ER through the three domains with ``evaluate_future``: R's upper triangle from the head."""
    root = tmp_path_factory.mktemp("future")
    yield {name: run_engine(root / name, trainer(name), stream, evaluate_future=True) for name in TRAINERS}


def checkpoint_state(out: Path, index: int) -> dict[str, Any]:
    return torch.load(out / "checkpoints" / f"task_{index:03d}.ckpt", map_location="cpu", weights_only=True)


@torch.no_grad()
def embed(backbone: Backbone, data: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings [N, D], labels [N])`` of ``data`` under the evaluation transform, as the engine's features."""
    transform = build_transform(backbone.input_size, backbone.mean, backbone.std, train=False)
    transformed = Transformed(data, transform)
    images, labels = zip(*(transformed[i] for i in range(len(transformed))), strict=True)
    return backbone.eval()(torch.stack(images)), torch.tensor(labels)


def prototypes(method: CILMethod) -> torch.Tensor:
    assert isinstance(method.head, PrototypeHead)
    return method.head.prototypes  # [C, D]


def class_means(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([embeddings[labels == c].mean(dim=0) for c in range(10)])  # [10, D]


def saved_summary(out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


# ---- refusal ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", REFUSING)
def test_methods_without_domain_support_are_refused_before_anything_is_written(
    name: str, stream: Stream, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # depth 5: DualPrompt and CODA-Prompt prompt blocks up to 4 by default
    with pytest.raises(ValueError, match=r"not defined for domain-incremental streams such as 'digits_domains'") as e:
        Engine(create_method(name, tiny_backbone(depth=5)), stream, out, data=TINY_DATA)
    message = str(e.value)
    assert "\n" not in message
    able = message.split("use one that is (")[1].split(")")[0].split(", ")
    assert {"simplecil", "finetune", "er"} <= set(able) and able == SUPPORTING and name not in able
    assert not out.exists()


# ---- SimpleCIL: prototypes over every domain so far --------------------------------------------------------------
def test_simplecil_prototypes_average_every_domain_so_far(stream: Stream, tmp_path: Path) -> None:
    torch.manual_seed(0)
    method = create_method("simplecil", tiny_backbone())
    untouched = copy.deepcopy(method.backbone)
    run_engine(tmp_path, method, stream)

    assert pd.read_csv(tmp_path / "tasks.csv")["n_new_classes"].tolist() == [10, 0, 0]
    assert len(prototypes(method)) == 10 and method.seen_classes == list(range(10)) and method.new_classes == []
    for step in range(len(stream)):  # after domain i: the class means over domains 0..i, by hand
        embeddings, labels = embed(untouched, ConcatDataset([task.train for task in stream.tasks[: step + 1]]))
        saved = checkpoint_state(tmp_path, step)["method"]["weights"]["head.prototypes"]
        torch.testing.assert_close(saved, class_means(embeddings, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prototypes(method), saved)
    last_only = class_means(*embed(untouched, stream[-1].train))
    assert not torch.allclose(prototypes(method), last_only, atol=1e-3)  # the check tells the two apart


def test_simplecil_resumed_after_a_crash_gives_the_same_prototypes_and_costs(stream: Stream, tmp_path: Path) -> None:
    """The images behind each prototype are checkpointed, so a resumed run averages later domains the same way and
    embeds nothing twice (train_images and FLOPs as in the uninterrupted run)."""
    torch.manual_seed(0)
    backbone = tiny_backbone()
    reference = run_engine(tmp_path / "reference", create_method("simplecil", copy.deepcopy(backbone)), stream)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_engine(tmp_path / "resumed", crash_during(create_method("simplecil", copy.deepcopy(backbone)), 2), stream)
    resumed = run_engine(tmp_path / "resumed", create_method("simplecil", copy.deepcopy(backbone)), stream, resume=True)
    torch.testing.assert_close(prototypes(resumed.method), prototypes(reference.method), rtol=0, atol=0)
    costs = [pd.read_csv(out / "tasks.csv") for out in (tmp_path / "reference", tmp_path / "resumed")]
    for column in ("train_images", "train_flops"):
        assert costs[0][column].tolist() == costs[1][column].tolist()


def test_task_incremental_on_a_domain_stream_is_refused(stream: Stream, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use protocol class_incremental"):
        Engine(create_method("simplecil", tiny_backbone()), stream, tmp_path / "out", protocol="task_incremental")
    assert not (tmp_path / "out").exists()


def test_simplecil_on_one_domain_keeps_that_domain_mean(tmp_path: Path) -> None:
    torch.manual_seed(0)
    method = create_method("simplecil", tiny_backbone())
    one = digits(domains=["uci_digits"])
    run_engine(tmp_path, method, one)
    assert pd.read_csv(tmp_path / "tasks.csv")["n_new_classes"].tolist() == [10]
    expected = class_means(*embed(method.backbone, one[0].train))
    torch.testing.assert_close(prototypes(method), expected, rtol=1e-5, atol=1e-5)


# ---- finetune / ER with evaluate_future -------------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAINERS)
def test_future_domains_are_scored_by_the_head(name: str, future_runs: dict[str, Engine], stream: Stream) -> None:
    engine = future_runs[name]
    R, T = engine.accuracy_matrix(), len(stream)
    assert R.shape == (T, T) and not np.isnan(R).any()  # the upper triangle too
    assert engine.method.head.num_classes == 10
    results = pd.read_csv(engine.out / "results.csv")
    assert (results["train_task"] >= 0).all()  # no zero-shot baseline: the head had no classes before task 0
    assert pd.read_csv(engine.out / "tasks.csv")["n_new_classes"].tolist() == [10, 0, 0]

    # every entry, trained or not yet: the accuracy of checkpoint i's model on domain j, computed here
    for i in range(T):
        restored = create_method(name, tiny_backbone(), **FROM_SCRATCH)
        restored.load_cil_state(checkpoint_state(engine.out, i)["method"], stream.tasks)
        restored.eval()
        for j, task in enumerate(stream):
            embeddings, labels = embed(restored.backbone, task.test)
            with torch.no_grad():
                predicted = restored.classify(embeddings).argmax(dim=1)
            assert R[i, j] == pytest.approx(100.0 * float((predicted == labels).float().mean()), abs=1e-4), (i, j)


@pytest.mark.parametrize("name", TRAINERS)
def test_transfer_metrics_without_a_baseline(name: str, future_runs: dict[str, Engine], stream: Stream) -> None:
    engine = future_runs[name]
    R, T = engine.accuracy_matrix(), len(stream)
    summary = saved_summary(engine.out)
    assert summary["fwt"] is None and summary["zero_shot_baseline"] == [None] * T
    transfer = [R[:j, j].mean() for j in range(1, T)]
    assert summary["mtil_transfer"] == pytest.approx(np.mean(transfer), abs=1e-3)
    assert summary["mtil_transfer_per_task"][0] is None
    assert summary["mtil_transfer_per_task"][1:] == pytest.approx(transfer, abs=1e-3)
    assert summary["mtil_average"] == pytest.approx(R.mean(), abs=1e-3)
    assert summary["mtil_last"] == pytest.approx(R[-1].mean(), abs=1e-3)
    assert summary["final_task_scores"] == pytest.approx(R[-1].tolist(), abs=1e-3)
    assert summary["task_names"] == [task.name for task in stream]
    # forgetting from the step a domain was trained on: its scores before that were never learned
    forgetting = [R[j : T - 1, j].max() - R[T - 1, j] for j in range(T - 1)]
    assert summary["forgetting_per_task"][:-1] == pytest.approx(forgetting, abs=1e-3)
    assert summary["forgetting_per_task"][-1] is None
    assert summary["avg_forgetting"] == pytest.approx(np.mean(forgetting), abs=1e-3)


def test_scoring_the_future_changes_nothing_else(
    future_runs: dict[str, Engine], stream: Stream, tmp_path: Path
) -> None:
    future = future_runs["finetune"]
    plain = run_engine(tmp_path, trainer("finetune"), stream)
    for step in range(len(stream)):  # training unchanged by scoring the future: the same weights after every domain
        weights = checkpoint_state(plain.out, step)["method"]["weights"]
        for key, value in checkpoint_state(future.out, step)["method"]["weights"].items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=f"{key} after domain {step}")
    R_future, R_plain = future.accuracy_matrix(), plain.accuracy_matrix()
    lower = np.tril(np.ones_like(R_plain, dtype=bool))
    np.testing.assert_array_equal(R_plain[lower], R_future[lower])
    assert np.isnan(R_plain[~lower]).all()
    summary = saved_summary(tmp_path)
    assert summary["fwt"] is None and summary["mtil_transfer"] is None and summary["mtil_average"] is None
    assert summary["mtil_last"] == pytest.approx(R_plain[-1].mean(), abs=1e-3)  # the last row exists either way


# ---- per-domain tables -----------------------------------------------------------------------------------------
def test_per_task_summaries_give_one_row_per_domain(future_runs: dict[str, Engine], stream: Stream) -> None:
    out = future_runs["finetune"].out
    summary = saved_summary(out)
    table = load_summaries([out], per_task=True)
    assert table["task"].tolist() == [*(task.name for task in stream), "Average"]
    assert (table["run"] == str(out)).all() and (table["method"] == "finetune").all()
    domains, average = table.iloc[:-1], table.iloc[-1]
    assert domains["final_accuracy"].tolist() == pytest.approx(summary["final_task_scores"])
    assert domains["forgetting"].iloc[:-1].tolist() == pytest.approx(summary["forgetting_per_task"][:-1])
    assert np.isnan(domains["forgetting"].iloc[-1])  # the last domain has nothing after it to forget in
    assert average["forgetting"] == pytest.approx(summary["avg_forgetting"])
    assert average["final_accuracy"] == pytest.approx(np.mean(summary["final_task_scores"]))
    assert np.isnan(domains["mtil_transfer"].iloc[0])
    assert domains["mtil_transfer"].iloc[1:].tolist() == pytest.approx(summary["mtil_transfer_per_task"][1:])
    for metric in ("mtil_transfer", "mtil_average", "mtil_last"):
        assert average[metric] == pytest.approx(summary[metric])


@pytest.mark.parametrize("name", ["joint", "codyra", "codyra_clip"])
def test_the_other_supporting_methods_learn_later_domains_in_one_label_space(
    name: str, stream: Stream, tmp_path: Path
) -> None:
    """joint retrains on every domain so far; CoDyRA's loss covers the current task's classes (here all ten), with
    a linear head or CLIP's class names, whose zero-shot scores give the baseline and FWT a domain stream lacks."""
    torch.manual_seed(0)
    if name == "codyra_clip":
        from tests.test_codyra import tiny_clip

        method = create_method("codyra", tiny_clip(), steps=2, lr=3e-3, rank=4)
    elif name == "codyra":
        method = create_method("codyra", tiny_backbone(), steps=2, lr=3e-3, rank=4)
    else:
        method = create_method(name, tiny_backbone(), **FROM_SCRATCH)
    head_before: list[Any] | None = None
    original_grow = method.grow

    def grow(task: Any) -> None:  # the head's parameters are built once, at the first domain, and kept after
        nonlocal head_before
        original_grow(task)
        current = [id(p) for p in method.head.parameters()] + [tuple(b.shape) for b in method.head.buffers()]
        if task.index > 0:
            assert current == head_before
        head_before = current

    method.grow = grow  # type: ignore[method-assign]
    engine = run_engine(tmp_path, method, stream, evaluate_future=True)
    assert not np.isnan(engine.accuracy_matrix()).any()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert pd.read_csv(tmp_path / "tasks.csv")["n_new_classes"].tolist() == [10, 0, 0]
    if name == "codyra_clip":
        assert method.head.prompts == [f"a photo of a {d}." for d in range(10)]  # type: ignore[union-attr]
        assert None not in summary["zero_shot_baseline"] and summary["fwt"] is not None
    else:
        assert summary["fwt"] is None
