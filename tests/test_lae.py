"""LAE: EMA accumulation, learning-speed calibration, the ensemble rule, every PET kind, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from cil.engine import Engine
from cil.layers import LoRALinear
from cil.task import Task
from methods.lae import LAE, ema_update
from tests.conftest import TINY_DATA, cpu_trainers, crash_during, tiny_backbone, tiny_stream


def _lae(**kwargs: Any) -> LAE:
    torch.manual_seed(0)
    return LAE(tiny_backbone(global_pool="avg"), **{"epochs": 2, "freeze_epochs": 1, "lr": 3e-3, **kwargs})


def _engine(out: Path, method: LAE, **engine: Any) -> Engine:
    stream = tiny_stream(increment=5, train_per_class=40)  # 2 tasks of 5 classes
    return Engine(method, stream, out, trainer_factory=cpu_trainers(out), seed=2, data=TINY_DATA, **engine)


def test_ema_update_gives_the_known_weights() -> None:
    offline, online = torch.ones(3), torch.full((3,), 3.0)
    ema_update(offline, online, decay=0.9)
    torch.testing.assert_close(offline, torch.full((3,), 1.2))
    ema_update(offline, online, decay=0.9)
    torch.testing.assert_close(offline, torch.full((3,), 0.9 * 1.2 + 0.1 * 3.0))


def test_offline_module_is_born_after_the_first_task_and_follows_every_step() -> None:
    method = _lae(ema_decay=0.5)
    task1 = Task(index=1, name="t1", classes=(2, 3), class_names=("2", "3"), train=[], test=[])  # type: ignore[arg-type]
    method.after_optimizer_step()  # task 0: no offline module yet, nothing accumulates
    assert not method.offline_born and torch.count_nonzero(method.offline) == 0
    for param in method.online.parameters():
        param.data.fill_(2.0)
    method.before_task(task1)
    torch.testing.assert_close(method.offline, torch.full_like(method.offline, 2.0))  # a copy of the online one
    for param in method.online.parameters():
        param.data.fill_(4.0)
    method.after_optimizer_step()
    method.after_optimizer_step()
    torch.testing.assert_close(method.offline, torch.full_like(method.offline, 0.25 * 2.0 + 0.75 * 4.0))


def test_the_pet_modules_compute_the_authors_formulas_with_learned_scales() -> None:
    """gqk/LAE ``libml/model/pet``: adapter ``attn(h) + s * up(GELU(down(h)))``; KVLoRA ``W_kv + s_kv B_kv A_kv``;
    every ``s`` a parameter from 1, trained and averaged into the offline module with the rest."""
    from cil.layers._adapter import MLPWithAdapter

    adapter_lae = _lae(pet="adapter")
    wrapped = adapter_lae.backbone.model.blocks[0].attn
    assert isinstance(wrapped, MLPWithAdapter)
    adapter = wrapped.adapter
    assert isinstance(adapter.scale, torch.nn.Parameter) and float(adapter.scale) == 1.0
    with torch.no_grad():
        adapter.up.weight.normal_()
        adapter.scale.fill_(0.5)
    h = torch.randn(2, 3, adapter.down.in_features)
    expected = 0.5 * adapter.up(torch.nn.functional.gelu(adapter.down(h)))
    torch.testing.assert_close(wrapped(h) - wrapped.base(h), expected)
    blocks = len(adapter_lae.backbone.model.blocks)  # all of the tiny ViT's (fewer than 5)
    assert adapter_lae.online.numel() == sum(p.numel() for p in adapter.parameters()) * blocks  # scales included

    lora_lae = _lae(pet="lora")
    qkv = lora_lae.backbone.model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and sorted(qkv.lora_scale) == ["k", "v"]
    dim = qkv.base.in_features
    with torch.no_grad():
        for name, value in (("k", 2.0), ("v", -1.0)):
            qkv.lora_B[name].normal_()
            qkv.lora_scale[name].fill_(value)
    x = torch.randn(4, dim)
    delta = torch.cat(
        [torch.zeros(dim, dim)] + [s * qkv.lora_B[n] @ qkv.lora_A[n] for n, s in (("k", 2.0), ("v", -1.0))]
    )
    torch.testing.assert_close(qkv(x), x @ (qkv.base.weight + delta).T + qkv.base.bias, rtol=1e-4, atol=1e-4)
    plain = _lae(pet="adapter", pet_options={"activation": "relu", "learn_scale": False})  # AdaptFormer's
    assert plain.backbone.model.blocks[0].attn.adapter.scale == 1.0
    assert plain.online.numel() == adapter_lae.online.numel() - blocks


def test_the_prefix_is_lae_s_compensated_prefix_with_learned_scales() -> None:
    """gqk/LAE ``Prefix``: keys and values prefixed (times learned scalars), softmax over all keys, then the weights
    on the prefix divided by their sum; written out here with explicit matmuls."""
    method = _lae(pet="prefix")
    prefixed = method.backbone.model.blocks[0].attn
    base: Any = prefixed.base
    assert float(prefixed.prefix_key.min()) >= 0.0 and float(prefixed.prefix_key.max()) <= 0.01
    with torch.no_grad():
        prefixed.key_scale.fill_(3.0)
        prefixed.value_scale.fill_(-2.0)
        prefixed.prefix_key.normal_()
    x = torch.randn(2, 5, base.head_dim * base.num_heads)
    B, N, C = x.shape
    H, d, P = base.num_heads, base.head_dim, prefixed.prefix_key.shape[0]
    q, k, v = base.qkv(x).chunk(3, dim=-1)
    k = torch.cat([3.0 * prefixed.prefix_key.expand(B, -1, -1), k], dim=1)
    v = torch.cat([-2.0 * prefixed.prefix_value.expand(B, -1, -1), v], dim=1)
    q, k, v = (t.reshape(B, -1, H, d).permute(0, 2, 1, 3) for t in (q, k, v))
    weights = (q @ k.transpose(-2, -1) * d**-0.5).softmax(dim=-1)  # [B, H, N, P + N]
    weights = torch.cat([weights[..., :P] / weights[..., :P].sum(-1, keepdim=True), weights[..., P:]], dim=-1)
    expected = base.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
    prefixed.eval()
    torch.testing.assert_close(prefixed(x), expected, rtol=1e-4, atol=1e-5)


def test_ensemble_takes_the_elementwise_max_of_the_two_softmaxes() -> None:
    online = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]]).log()
    offline = torch.tensor([[0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]).log()
    chosen = LAE._choose(online, offline, "ensemble")
    torch.testing.assert_close(chosen.exp(), torch.tensor([[0.7, 0.2, 0.8], [0.3, 0.5, 0.4]]))
    assert chosen.argmax(1).tolist() == [2, 1]
    assert LAE._choose(online, None, "ensemble") is online  # before the offline module exists


@pytest.mark.parametrize(("freeze_epochs", "moves"), [(2, False), (1, True)])
def test_calibration_freezes_the_pet_module_for_the_first_epochs_of_later_tasks(
    freeze_epochs: int, moves: bool, tmp_path: Path
) -> None:
    method = _lae(freeze_epochs=freeze_epochs)
    head_rows: list[torch.Tensor] = []
    vectors: list[torch.Tensor] = []
    original = method.after_task

    def record(task: Task, features: Any) -> None:
        vectors.append(method.online.vector())
        head_rows.append(method.head.weight.detach().clone())
        original(task, features)

    method.after_task = record  # type: ignore[method-assign]
    _engine(tmp_path, method).run()
    assert not torch.equal(vectors[0], torch.zeros_like(vectors[0]))  # task 0 trains the PET module from epoch 0
    assert torch.equal(vectors[0], vectors[1]) is not moves
    torch.testing.assert_close(head_rows[1][:5], head_rows[0])  # old classes' rows: masked, never updated


# Learning rates at which each PET kind fits the random tiny ViT best. Prefix tuning trains here (every tensor moves),
# but it needs pre-trained features to fit the digits (tests/test_methods.py), so its accuracy is not checked.
TINY_LR = {"adapter": 3e-3, "lora": 1e-2, "prefix": 1e-2}


@pytest.mark.parametrize("pet", ["adapter", "lora", "prefix"])
def test_every_pet_kind_learns_and_records_the_three_accuracies(pet: str, tmp_path: Path) -> None:
    method = _lae(pet=pet, epochs=10, freeze_epochs=3, lr=TINY_LR[pet])
    torch.manual_seed(0)
    plain = tiny_backbone(global_pool="avg").eval()  # the backbone _lae built, without the PET module
    engine = _engine(tmp_path, method)
    test = engine.stream[0].test
    x = torch.stack([engine.eval_transform(test[i][0]) for i in range(16)])  # [16, 3, H, W]

    def embedding() -> torch.Tensor:
        with torch.no_grad(), method.evaluating():
            return method.embed(x)  # [16, D]: the online model's

    def pet_tensors() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in zip(method.online.names, method.online.parameters(), strict=True)}

    pet_at_start, embedding_at_start = pet_tensors(), embedding()
    frozen_at_start = {n: p.detach().clone() for n, p in method.backbone.named_parameters() if n not in pet_at_start}
    with torch.no_grad():
        plain_features = plain(x)
    if pet != "prefix":  # adapters and LoRA start at zero (as the plain backbone); prefixes start random
        torch.testing.assert_close(embedding_at_start, plain_features)
    after_first: dict[str, Any] = {}
    original = method.after_task

    def record(task: Task, features: Any) -> None:
        if task.index == 0:
            after_first.update(pet=pet_tensors(), embedding=embedding())
        original(task, features)

    method.after_task = record  # type: ignore[method-assign]
    engine.run()

    # the first task trained every tensor of the PET module (so each one received gradients) and nothing else of
    # the backbone, and the features moved: away from the plain backbone's and from the untrained PET module's
    unchanged = [n for n, value in after_first["pet"].items() if torch.equal(value, pet_at_start[n])]
    assert not unchanged, f"lae {pet}: task 0 left these PET tensors unchanged: {unchanged}"
    for name, param in method.backbone.named_parameters():
        if name not in pet_at_start:
            assert torch.equal(param, frozen_at_start[name]), f"lae {pet}: the frozen backbone's {name} changed"
    for reference in (plain_features, embedding_at_start):
        assert (after_first["embedding"] - reference).abs().max() > 1e-3, f"lae {pet}: the features did not move"

    tasks = pd.read_csv(tmp_path / "tasks.csv")
    assert {"online_acc", "offline_acc", "ensemble_acc"} <= set(tasks.columns)
    assert tasks.loc[0, "online_acc"] == tasks.loc[0, "offline_acc"] == tasks.loc[0, "ensemble_acc"]  # no offline
    R = engine.accuracy_matrix()
    if pet != "prefix":  # learns each task (chance: 20 %)
        assert R[0, 0] > 38.0 and R[1, 1] > 35.0, f"lae {pet} does not learn: {R.round(1).tolist()}"
    if pet == "lora":  # K and V only; both moved away from their zero init
        lora = next(m for m in method.backbone.modules() if isinstance(m, LoRALinear))
        assert set(lora.slices) == {"k", "v"} and all(b.abs().sum() > 0 for b in lora.lora_B.values())


def test_resume_after_the_first_task_gives_the_uninterrupted_results(tmp_path: Path) -> None:
    _engine(tmp_path / "reference", _lae()).run()
    crashing = crash_during(_lae(), 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _engine(tmp_path / "crashed", crashing).run()
    _engine(tmp_path / "crashed", _lae(), resume=True).run()
    reference, resumed = (pd.read_csv(tmp_path / name / "results.csv") for name in ("reference", "crashed"))
    pd.testing.assert_frame_equal(resumed, reference)


@pytest.mark.parametrize("bad", [{"pet": "ssf"}, {"inference": "mean"}, {"ema_decay": 1.5}])
def test_bad_options_say_what_is_allowed(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        LAE(tiny_backbone(), **bad)
