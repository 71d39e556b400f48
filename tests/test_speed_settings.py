"""The engine's speed settings on the CPU: channels-last weights and the compiled frozen embedding give the eager,
contiguous answer (their GPU speed is measured by benchmarks/throughput.py), and batches are pinned only for a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cil.backbones import Backbone
from cil.method import create_method
from tests.conftest import TINY_VIT, cpu_trainers, run_engine, tiny_stream


def test_channels_last_keeps_convolution_weights_nhwc_and_the_features() -> None:
    torch.manual_seed(0)
    nhwc = Backbone("resnet10t", input_size=32)
    contiguous = Backbone("resnet10t", input_size=32, channels_last=False)
    contiguous.load_state_dict(nhwc.state_dict())
    four_d = [p for p in nhwc.parameters() if p.ndim == 4]
    assert four_d and all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in contiguous.parameters() if p.ndim == 4)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(nhwc.eval()(x), contiguous.eval()(x), rtol=1e-4, atol=1e-5)


def test_a_compiled_frozen_embedding_scores_as_the_eager_one(tmp_path: Path) -> None:
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        method = create_method("simplecil", Backbone(**TINY_VIT, compile=compiled))
        engine = run_engine(tmp_path / str(compiled), method, tiny_stream(increment=5))
        assert (method._compiled_embed is not None) is compiled  # the compiled path was the one taken
        results.append(engine.accuracy_matrix())
    np.testing.assert_allclose(results[1], results[0], atol=1e-9)


def test_a_trained_embedding_is_never_compiled() -> None:
    method = create_method("finetune", Backbone(**TINY_VIT, compile=True))
    assert not method.embedding_frozen
    assert method.extraction_embed() == method.embed  # eager: its weights change every step


def test_batches_are_pinned_only_for_a_gpu(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from cil.engine import _on_gpu

    assert not _on_gpu(cpu_trainers(tmp_path)(0, [], {}))
    assert _on_gpu(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0))))  # type: ignore[arg-type]


def test_runs_written_before_the_speed_settings_existed_still_resume() -> None:
    from cil.engine import config_hash

    old = {"seed_everything": 1, "backbone": {"name": "tf_efficientnet_lite0", "input_size": 128}}
    new = {**old, "backbone": {**old["backbone"], "channels_last": True, "compile": False}}
    assert config_hash(new) == config_hash(old)
    assert config_hash({**old, "backbone": {**new["backbone"], "compile": True}}) != config_hash(old)
    assert config_hash({**old, "backbone": {**new["backbone"], "channels_last": False}}) != config_hash(old)
