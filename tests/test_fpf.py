"""FPF, k-FPF and ER: trigger schedule, what FPF changes and restores, distillation targets, FLOPs, resume, and
the module-sensitivity analysis on a ViT and a CNN."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch

import methods.er as er_module
from cil.backbones import Backbone
from cil.buffer import ReservoirBuffer
from cil.engine import Engine
from cil.method import CILMethod, create_method
from cil.sensitivity import SensitivityRecorder, module_units, rank_modules, select_units, unit_tensors
from cil.task import Task
from methods.er import replay_batch
from tests.conftest import TINY_DATA, cpu_trainers, crash_during, tiny_backbone, tiny_stream

ADAMW = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0}
FAST_FPF = {"buffer_size": 30, "fpf_steps": 3, "fpf_batch_size": 8}


def _run(method: CILMethod, out: Path, increment: int = 2, epochs: int = 1, **engine: Any) -> Engine:
    stream = tiny_stream(increment=increment, train_per_class=20)
    trainers = cpu_trainers(out, max_epochs=epochs, callbacks=engine.pop("callbacks", []))
    runner = Engine(method, stream, out, trainer_factory=trainers, data=TINY_DATA, seed=5, **engine)
    runner.run()
    return runner


@pytest.mark.parametrize(("k", "expected"), [(3, [0, 1, 0, 1, 1]), (10, [2, 2, 2, 2, 2]), (1, [0, 0, 0, 0, 1])])
def test_kfpf_spreads_k_finetunings_evenly_over_the_stream(k: int, expected: list[int], tmp_path: Path) -> None:
    """Trigger i fires once the stream is (i + 1) * T / k tasks in: for T = 5, k = 3 at 1.67, 3.33 and 5 tasks."""
    torch.manual_seed(0)
    method = create_method("kfpf", tiny_backbone(), k=k, **FAST_FPF, **ADAMW)
    _run(method, tmp_path)
    runs = pd.read_csv(tmp_path / "tasks.csv").get("fpf_runs", pd.Series([0] * 5)).fillna(0).astype(int)
    assert runs.tolist() == expected
    assert int(method.fired) == k


def test_fpf_finetunes_only_its_modules_and_restores_them_for_the_wrapped_method(tmp_path: Path) -> None:
    """FPF after every task is "the method plus FPF, had the stream ended here": the wrapped method trains on from
    its own weights, so every unit outside FPF's choice ends exactly as without FPF, and the chosen ones differ."""
    torch.manual_seed(0)
    plain = _run(create_method("finetune", tiny_backbone(), **ADAMW), tmp_path / "finetune", increment=5).method
    torch.manual_seed(0)
    fpf = create_method("fpf", tiny_backbone(), method_args=ADAMW, modules=["norm", "head"], **FAST_FPF)
    runner = _run(fpf, tmp_path / "fpf", increment=5)
    assert type(fpf).__name__ == "FPF[Finetune]"
    assert pd.read_csv(tmp_path / "fpf" / "results.csv")["method"].eq("fpf").all()
    finetuned = {key for unit in select_units(fpf, ["norm", "head"]) for key, _ in unit_tensors(fpf, unit)}
    reference = plain.state_dict()
    for key, value in fpf.state_dict().items():
        if key == "_extra_state":
            continue
        if key in finetuned:
            assert not torch.equal(value, reference[key]), f"FPF did not change {key}"
        else:
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=f"FPF changed {key}")
    assert fpf.pre_fpf == {}  # nothing to restore after the last task
    costs = pd.read_csv(tmp_path / "fpf" / "tasks.csv")
    assert (costs["fpf_params"] < costs["trainable_params"] / 10).all()
    assert (tmp_path / "fpf" / "logs" / "task_000_consolidation").is_dir()
    assert runner.summary()["train_flops"] > 0


def test_fpf_last_task_only_leaves_the_earlier_rows_to_the_wrapped_method(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = _run(create_method("finetune", tiny_backbone(), **ADAMW), tmp_path / "finetune", increment=5)
    torch.manual_seed(0)
    fpf = create_method("fpf", tiny_backbone(), method_args=ADAMW, apply="last_task", **FAST_FPF)
    wrapped = _run(fpf, tmp_path / "fpf", increment=5)
    assert wrapped.accuracy_matrix()[0, 0] == plain.accuracy_matrix()[0, 0]
    assert not (tmp_path / "fpf" / "logs" / "task_000_consolidation").exists()
    assert (tmp_path / "fpf" / "logs" / "task_001_consolidation").is_dir()


def test_fpf_over_er_shares_its_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One buffer, ER's: built by ER's initialiser with ER's size, filled once per task (by ER), replayed from by
    ER's training steps and finetuned on by FPF's consolidation fits."""
    built: list[ReservoirBuffer] = []  # the buffers ER's initialiser builds
    replayed: set[int] = set()  # ids of the buffers ER's training steps draw from

    def build(*args: Any, **kwargs: Any) -> ReservoirBuffer:
        built.append(ReservoirBuffer(*args, **kwargs))
        return built[-1]

    def replay(method: CILMethod, buffer: ReservoirBuffer, size: int, shard: bool = False) -> tuple[torch.Tensor, ...]:
        replayed.add(id(buffer))
        return replay_batch(method, buffer, size, shard)

    monkeypatch.setattr(er_module, "ReservoirBuffer", build)
    monkeypatch.setattr(er_module, "replay_batch", replay)
    torch.manual_seed(0)
    fpf = create_method("fpf", tiny_backbone(), method="er", method_args={"buffer_size": 30, **ADAMW}, fpf_steps=2)
    assert len(built) == 1 and fpf.buffer is built[0] and fpf.buffer.capacity == 30
    consolidated: set[int] = set()  # ids of the buffers FPF's consolidation datasets read
    original = fpf.consolidation_dataset

    def consolidation_dataset(task: Task, seen: Any) -> Any:
        dataset = original(task, seen)
        consolidated.add(id(dataset.buffer))
        return dataset

    fpf.consolidation_dataset = consolidation_dataset  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="method_args"):
        create_method("fpf", tiny_backbone(), method="er", method_args={"buffer_size": 30}, buffer_size=50)
    with pytest.raises(ValueError, match="already finetunes"):
        create_method("fpf", tiny_backbone(), method="kfpf")
    _run(fpf, tmp_path, increment=5)
    assert len(fpf.buffer) == 30 and set(fpf.buffer.task_counts()) == {0, 1}
    assert fpf.buffer.offered == 2 * 100  # each of the 2 tasks' 100 training images offered once, not once per owner
    assert replayed == consolidated == {id(fpf.buffer)}


def test_kd_targets_are_the_logits_after_each_images_task(tmp_path: Path) -> None:
    torch.manual_seed(0)
    method = create_method("kfpf", tiny_backbone(), k=5, variant="kd", **FAST_FPF, **ADAMW)
    _run(method, tmp_path)
    widths = {}
    for task, logits in zip(method.buffer.tasks, method.buffer.logits, strict=True):
        assert logits is not None
        widths.setdefault(task, set()).add(len(logits))
    assert widths == {t: {2 * (t + 1)} for t in range(5)}  # recorded when the image's own task ended
    assert create_method("kfpf", tiny_backbone(), variant="sgd").kd_weight == 0.0
    with pytest.raises(ValueError, match="variant"):
        create_method("kfpf", tiny_backbone(), variant="der")


def test_fpf_flops_are_counted_and_depend_on_the_modules(tmp_path: Path) -> None:
    """k-FPF's FLOPs are plain fine-tuning's plus its FPF runs (counted inside the fit, where the engine's sampler
    cannot see them); finetuning the head alone needs no backward pass through the backbone, so it costs less."""
    costs = {}
    for name, kwargs in {
        "finetune": {},
        "kfpf_head": {"k": 5, "modules": ["head"], **FAST_FPF},
        "kfpf_paper": {"k": 5, **FAST_FPF},
    }.items():
        torch.manual_seed(0)
        method = create_method(name.split("_")[0], tiny_backbone(), **kwargs, **ADAMW)
        costs[name] = _run(method, tmp_path / name).summary()["train_flops"]
    assert costs["finetune"] < costs["kfpf_head"] < costs["kfpf_paper"]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("kfpf", {"k": 7, "variant": "kd", "modules": ["top:4"], **FAST_FPF, **ADAMW}),
        ("fpf", {"method": "er", "method_args": {"buffer_size": 30, **ADAMW}, "fpf_steps": 3}),
    ],
)
def test_resume_gives_the_uninterrupted_results(name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """The buffer, the trigger count, the restore state and the run's own sensitivity ranking are checkpointed."""
    torch.manual_seed(0)
    _run(create_method(name, tiny_backbone(), **kwargs), tmp_path / "reference", epochs=2)
    torch.manual_seed(0)
    crashing = crash_during(create_method(name, tiny_backbone(), **kwargs), task_index=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(crashing, tmp_path / "resumed", epochs=2)
    torch.manual_seed(0)
    _run(create_method(name, tiny_backbone(), **kwargs), tmp_path / "resumed", epochs=2, resume=True)
    for file in ("results.csv", "accuracy_matrix.csv"):
        expected = pd.read_csv(tmp_path / "reference" / file)
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "resumed" / file), expected)


def test_er_replays_from_a_buffer_saved_in_the_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    er = create_method("er", tiny_backbone(), buffer_size=25, replay_batch_size=8, **ADAMW)
    runner = _run(er, tmp_path / "er")
    torch.manual_seed(0)
    finetune = _run(create_method("finetune", tiny_backbone(), **ADAMW), tmp_path / "finetune")
    # one replay image per current image up to the replay batch size: more work per step than fine-tuning
    assert runner.summary()["train_flops"] > 1.1 * finetune.summary()["train_flops"]
    state = torch.load(tmp_path / "er" / "checkpoints" / "task_004.ckpt", weights_only=True)["method"]["weights"]
    saved = state["_extra_state"]["buffer"]
    assert len(saved["labels"]) == 25 and sorted(set(saved["tasks"])) == [0, 1, 2, 3, 4]


def test_sensitivity_recorder_ranks_every_unit_of_a_vit_and_a_cnn(tmp_path: Path) -> None:
    cnn = Backbone(name="tf_efficientnet_lite0", pretrained=False, input_size=16)
    for label, backbone in {"vit": tiny_backbone(), "cnn": cnn}.items():
        torch.manual_seed(0)
        method = create_method("finetune", backbone, **ADAMW)
        out = tmp_path / label
        _run(method, out, increment=5, epochs=2, callbacks=[SensitivityRecorder()])
        frame = pd.read_csv(out / "sensitivity.csv")
        units = module_units(method)
        assert set(frame["unit"]) == set(units) and set(frame["task"]) == {0, 1} and set(frame["epoch"]) == {1, 2}
        assert (frame["change"] > 0).all()  # everything trains under fine-tuning
        ranking = pd.read_csv(out / "sensitivity_rank.csv")
        assert ranking["rank"].tolist() == list(range(1, len(units) + 1))
        assert ranking["score"].is_monotonic_decreasing
        pd.testing.assert_frame_equal(ranking, rank_modules(frame), check_dtype=False)
        assert select_units(method, ["top:3"], ranking) == ranking["unit"].head(3).tolist()
    kinds = set(frame["kind"])  # the CNN's units include BatchNorm layers, whose running statistics count
    assert "BatchNormAct2d" in kinds and "Conv2dSame" in kinds
    with pytest.raises(ValueError, match="selects nothing"):
        select_units(method, ["transformer_blocks.*"])


def test_unit_groups_resolve_on_a_vit() -> None:
    method = create_method("finetune", tiny_backbone())
    method.head.expand(3)
    assert select_units(method, ["first_conv"]) == ["backbone.model.patch_embed.proj"]
    assert select_units(method, ["head"]) == ["head"]
    assert set(select_units(method, ["patch_embed"])) == {
        "backbone.model.patch_embed.proj",
        "backbone.model.cls_token",
        "backbone.model.pos_embed",
    }
    norms = select_units(method, ["type:LayerNorm"])
    assert norms == select_units(method, ["norm"]) and len(norms) == 5  # 2 blocks x 2 + the final norm
    with pytest.raises(ValueError, match="ranking"):
        select_units(method, ["top:2"])


def test_head_lr_gives_the_head_its_own_learning_rate() -> None:
    method = create_method("kfpf", tiny_backbone(), optimizer="adamw", lr=1e-5, head_lr=1e-2)
    method.head.expand(2)
    method.trainer = SimpleNamespace(estimated_stepping_batches=10)  # type: ignore[assignment]
    groups = method.configure_optimizers()["optimizer"].param_groups
    head = {id(p) for p in method.head.parameters()}
    assert [g["lr"] for g in groups] == [1e-5, 1e-2]
    assert {id(p) for p in groups[1]["params"]} == head and not head & {id(p) for p in groups[0]["params"]}
    assert len(create_method("finetune", tiny_backbone()).head.weight) == 0  # nothing else changes by default


def test_fpf_steps_scale_the_loss_and_unscale_the_gradients_under_fp16() -> None:
    from methods.fpf import _backward_and_step

    scaled, plain = (torch.nn.Parameter(torch.tensor([1.0, -2.0])) for _ in range(2))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    seen: list[float] = []
    scale = scaler.scale
    scaler.scale = lambda loss: seen.append(float(loss)) or scale(loss)  # type: ignore[method-assign,func-returns-value]
    for param, grad_scaler in ((scaled, scaler), (plain, None)):
        _backward_and_step((param**2).sum(), torch.optim.SGD([param], lr=0.1), grad_scaler)
    assert seen == [5.0]  # the loss went through the scaler
    torch.testing.assert_close(scaled, plain)  # and the step saw the unscaled gradient
    assert scaled.grad is not None and scaled.grad.tolist() == [2.0, -4.0]

    overflow = torch.nn.Parameter(torch.tensor([1.0]))
    _backward_and_step(overflow.sum() * float("inf"), torch.optim.SGD([overflow], lr=0.1), scaler)
    assert overflow.item() == 1.0 and scaler.get_scale() < 1024.0  # a step with inf gradients is skipped
