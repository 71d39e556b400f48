"""CoDyRA: gated LoRA, soft-thresholding, merge-and-unload after every task, selected ranks; the retention probe."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from cil.backbones import Backbone
from cil.clip import ClassNameHead
from cil.engine import Engine
from cil.layers import LoRALinear, inject, inject_lora_open_clip, unload_lora
from cil.method import create_method
from cil.results import selected_ranks
from cil.stream import build_stream
from tests.conftest import TINY_DATA, cpu_trainers, crash_during, tiny_backbone, tiny_stream

TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")


def test_unloading_merged_lora_restores_the_architecture_and_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    backbone = tiny_backbone()
    original = sum(p.numel() for p in backbone.parameters())
    modules = inject(backbone, "lora", targets=TARGETS, rank=4, alpha=4.0, gated=True)
    assert len(modules) == 2 * 4  # 2 blocks x (qkv, proj, fc1, fc2)
    for module in modules:  # a non-zero update (B starts at zero)
        for b in module.lora_B.values():  # type: ignore[union-attr]
            torch.nn.init.normal_(b, std=0.5)
    backbone.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        unmerged = backbone(x)
    assert sum(p.numel() for p in backbone.parameters()) > original
    assert unload_lora(backbone) == len(modules)
    assert not any(isinstance(m, LoRALinear) for m in backbone.modules())
    assert sum(p.numel() for p in backbone.parameters()) == original
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), unmerged, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(backbone(x), tiny_backbone()(x))


def test_soft_thresholding_prunes_gates_and_counts_surviving_ranks() -> None:
    module = LoRALinear(torch.nn.Linear(6, 6), {"all": (0, 6)}, rank=4, gated=True)
    with torch.no_grad():
        module.lora_gate["all"].copy_(torch.tensor([0.5, -0.2, 0.05, -1.0]))
    module.soft_threshold_(0.1)
    torch.testing.assert_close(module.lora_gate["all"].data, torch.tensor([0.4, -0.1, 0.0, -0.9]))
    assert module.active_ranks() == {"all": 3}
    ungated = LoRALinear(torch.nn.Linear(6, 6), {"all": (0, 6)}, rank=4)
    assert ungated.active_ranks() == {"all": 4} and len(ungated.lora_gate) == 0


def test_threshold_is_zero_while_dense_then_rises_to_kappa_max() -> None:
    method = create_method("codyra", tiny_backbone(), kappa_max=0.01, dense_fraction=0.5, threshold_levels=5)
    schedule = [method.threshold(step, 100) for step in range(100)]  # type: ignore[attr-defined]
    assert schedule[:50] == [0.0] * 50
    assert schedule[50] > 0 and schedule == sorted(schedule)
    assert schedule[-1] == pytest.approx(0.01)


def run_codyra(out: Path, **kwargs: object) -> Engine:
    torch.manual_seed(0)
    options = {"epochs": 4, "lr": 3e-3, "kappa_max": 0.05, "rank": 4, **kwargs}
    method = create_method("codyra", tiny_backbone(), **options)
    engine = Engine(method, tiny_stream(increment=5), out, trainer_factory=cpu_trainers(out), data=TINY_DATA, seed=1)
    engine.run()
    return engine


def test_codyra_selects_ranks_per_layer_and_leaves_the_original_architecture(tmp_path: Path) -> None:
    engine = run_codyra(tmp_path / "codyra")
    method = engine.method
    reference = sum(p.numel() for p in tiny_backbone().parameters())
    assert not any(isinstance(m, LoRALinear) for m in method.backbone.modules())
    assert sum(p.numel() for p in method.backbone.parameters()) == reference
    tasks = pd.read_csv(tmp_path / "codyra" / "tasks.csv")
    ranks = selected_ranks(tasks)
    assert set(ranks.columns) == {"task", "layer", "rank"}
    assert len(ranks) == 2 * 2 * 6  # 2 tasks x 2 blocks x 6 targets
    assert ranks["layer"].str.contains("blocks.1.attn.qkv.k").any()
    assert ranks["rank"].between(0, 4).all() and ranks["rank"].lt(4).any()  # thresholding dropped ranks
    assert (tasks["trainable_params"] > 0).all()
    import matplotlib

    matplotlib.use("Agg")
    from cil.plots import selected_ranks_heatmap

    ax = selected_ranks_heatmap(ranks)
    assert len(ax.get_yticklabels()) == 12 and ax.get_yticklabels()[0].get_text().startswith("blocks.0.")

    plain = run_codyra(tmp_path / "lora", rank_selection=False)
    plain_ranks = selected_ranks(pd.read_csv(tmp_path / "lora" / "tasks.csv"))
    assert plain_ranks["rank"].eq(4).all()
    assert not any(isinstance(m, LoRALinear) for m in plain.method.backbone.modules())


def test_codyra_resumes_to_identical_results(tmp_path: Path) -> None:
    reference = run_codyra(tmp_path / "reference")
    torch.manual_seed(0)
    options = {"epochs": 4, "lr": 3e-3, "kappa_max": 0.05, "rank": 4}
    crashing = crash_during(create_method("codyra", tiny_backbone(), **options), task_index=1)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        Engine(crashing, tiny_stream(increment=5), out, trainer_factory=cpu_trainers(out), data=TINY_DATA, seed=1).run()
    torch.manual_seed(0)
    fresh = create_method("codyra", tiny_backbone(), **options)
    Engine(
        fresh, tiny_stream(increment=5), out, trainer_factory=cpu_trainers(out), data=TINY_DATA, seed=1, resume=True
    ).run()
    expected = pd.read_csv(tmp_path / "reference" / "results.csv")
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), expected)
    assert reference.accuracy_matrix().shape == (2, 2)


def test_retention_probe_is_constant_for_a_frozen_backbone_and_moves_under_finetuning(tmp_path: Path) -> None:
    held_out = build_stream({"name": "nevis_offline", "stop_year": 2005, "train_per_class": 6, "test_per_class": 6})
    summaries = {}
    for name, kwargs in {"simplecil": {}, "finetune": {"optimizer": "adamw", "lr": 3e-3}}.items():
        torch.manual_seed(0)
        out = tmp_path / name
        method = create_method(name, tiny_backbone(), **kwargs)
        engine = Engine(
            method,
            tiny_stream(increment=5),
            out,
            trainer_factory=cpu_trainers(out, max_epochs=5),
            data=TINY_DATA,
            seed=1,
            retention=held_out,
        )
        summaries[name] = engine.run()
        results = pd.read_csv(out / "results.csv")
        assert results.groupby("train_task")["retention_acc"].nunique().eq(1).all()
        assert json.loads((out / "summary.json").read_text())["retention_acc"] == summaries[name]["retention_acc"]
    frozen, tuned = summaries["simplecil"], summaries["finetune"]
    assert len(frozen["retention_acc"]) == 2 and frozen["retention_acc_before"] == tuned["retention_acc_before"]
    assert frozen["retention_acc"] == [frozen["retention_acc_before"]] * 2 and frozen["retention_drop"] == 0
    assert tuned["retention_acc"] != frozen["retention_acc"]
    assert tuned["retention_drop"] == pytest.approx(tuned["retention_acc_before"] - tuned["retention_acc"][-1])


TINY_CLIP = {
    "name": "open_clip/tiny",
    "model_kwargs": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 4, "layers": 2, "width": 32, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
}


def tiny_clip() -> Backbone:
    pytest.importorskip(
        "open_clip", reason="the CLIP path needs the `clip` extra (dev installs it): pip install -e '.[clip]'"
    )
    return Backbone(**TINY_CLIP)


def test_lora_on_both_clip_towers_merges_back_to_the_original_model() -> None:
    torch.manual_seed(0)
    backbone = tiny_clip()
    original = sum(p.numel() for p in backbone.parameters())
    modules = inject_lora_open_clip(backbone.clip, rank=4, alpha=4.0, gated=True)  # type: ignore[arg-type]
    assert len(modules) == 2 * 2 * 4  # 2 towers x 2 blocks x (in_proj, out_proj, c_fc, c_proj)
    for module in modules:
        for b in module.lora_B.values():  # type: ignore[union-attr]
            torch.nn.init.normal_(b, std=0.5)
    backbone.eval()
    x = torch.randn(2, 3, 16, 16)
    head = ClassNameHead(backbone.clip, backbone.tokenizer)  # type: ignore[arg-type]
    with torch.no_grad():
        image, text = backbone(x), head.encode(["cat", "dog"])
    assert unload_lora(backbone) == len(modules)
    assert sum(p.numel() for p in backbone.parameters()) == original
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head.encode(["cat", "dog"]), text, rtol=1e-5, atol=1e-5)


def test_codyra_with_clip_classifies_with_class_name_embeddings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    method = create_method("codyra", tiny_clip(), epochs=3, lr=3e-3, rank=4, kappa_max=0.05)
    stream = tiny_stream(increment=5)
    engine = Engine(method, stream, tmp_path, trainer_factory=cpu_trainers(tmp_path), data=TINY_DATA, seed=1)
    engine.run()
    head = method.head
    assert isinstance(head, ClassNameHead) and head.prompts == [
        f"a photo of a {n}." for t in stream for n in t.class_names
    ]
    assert head.text.shape == (10, 16) and torch.allclose(head.text.norm(dim=1), torch.ones(10))
    ranks = selected_ranks(pd.read_csv(tmp_path / "tasks.csv"))
    assert ranks["layer"].str.startswith("clip.transformer.resblocks").any()  # the text tower was adapted too
    assert ranks["layer"].str.startswith("clip.visual.transformer.resblocks").any()
    assert not any(isinstance(m, LoRALinear) for m in method.modules())
