"""The run directory's files on disk: their mode follows the umask, checkpoints carry a checksum that resume checks,
and a finished run resumed rebuilds its results files."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cil.cli import main
from cil.engine import Engine
from cil.results import atomic_torch_save, atomic_write_text, content_sha256
from methods.finetune import Finetune
from tests.conftest import crash_during, run_engine, tiny_backbone, tiny_stream

ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILES = ["results.csv", "tasks.csv", "accuracy_matrix.csv", "summary.json"]


def run(out: Path, method: Finetune | None = None, **kwargs: Any) -> Engine:
    return run_engine(
        out, method or Finetune(tiny_backbone(), optimizer="adamw", lr=1e-3), tiny_stream(increment=5), **kwargs
    )


def never_trains() -> Finetune:
    """A method that raises if the engine begins any task of the two-task stream: a resume must train nothing."""
    method = Finetune(tiny_backbone(), optimizer="adamw", lr=1e-3)
    for index in range(2):
        crash_during(method, index)
    return method


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of the two-task tiny stream to its end; tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(out)
    return out


@pytest.fixture
def finished(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _tensors(value: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{where}.{key}")


def flip_a_tensor_byte(path: Path) -> None:
    """Flips one bit in the middle of the largest tensor storage of the checkpoint at ``path``, and checks that
    ``torch.load`` reads the result without complaint, with exactly that one tensor changed. ``torch.save`` writes
    an uncompressed zip: a storage's bytes are its record's data, right after the record's local header."""
    before = torch.load(path, weights_only=True)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max((r for r in archive.infolist() if "/data/" in r.filename), key=lambda r: r.file_size)
    assert record.compress_type == zipfile.ZIP_STORED
    name_length, extra_length = struct.unpack_from("<HH", data, record.header_offset + 26)
    data[record.header_offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))

    after = torch.load(path, weights_only=True)  # no error: without a checksum, the corruption goes unnoticed
    old, new = dict(_tensors(before)), dict(_tensors(after))
    assert old.keys() == new.keys()
    assert [k for k in old if not torch.equal(old[k], new[k])] == [max(old, key=lambda k: old[k].nbytes)]
    assert {k: v for k, v in after.items() if k != "method"} == {k: v for k, v in before.items() if k != "method"}


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)], ids=["umask_022", "umask_027"])
def test_run_directory_files_get_the_mode_open_would_give(umask: int, mode: int, tmp_path: Path) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "summary.json", "{}")
        atomic_torch_save({"weights": torch.zeros(2)}, tmp_path / "checkpoints" / "task_000.ckpt")
        (tmp_path / "opened.txt").write_text("")  # what open(path, "w") gives, for comparison
    finally:
        os.umask(previous)
    for name in ["summary.json", "checkpoints/task_000.ckpt", "opened.txt"]:
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert not list(tmp_path.rglob("*.tmp"))


def test_the_content_checksum_survives_save_and_load_and_sees_any_change(tmp_path: Path) -> None:
    state = {
        "weights": {"w": torch.randn(3, 4).t(), "half": torch.ones(2, dtype=torch.bfloat16), "scalar": torch.tensor(3)},
        "seen_classes": (1, 2),
        "names": {"cat", "dog", "emu"},
        "results": [{"accuracy": 50.0, "n_correct": None, "metric": "top1"}],
    }
    atomic_torch_save(state, tmp_path / "state.ckpt")
    loaded = torch.load(tmp_path / "state.ckpt", weights_only=True)
    assert content_sha256(loaded) == content_sha256(state)
    loaded["weights"]["w"][2, 1] += 1e-6
    assert content_sha256(loaded) != content_sha256(state)
    loaded = torch.load(tmp_path / "state.ckpt", weights_only=True)
    loaded["results"][0]["accuracy"] = 50.000001
    assert content_sha256(loaded) != content_sha256(state)


def test_resume_refuses_a_checkpoint_whose_tensor_bytes_changed(finished: Path) -> None:
    newest = finished / "checkpoints" / "task_001.ckpt"
    assert "sha256" in torch.load(newest, weights_only=True)
    flip_a_tensor_byte(newest)
    with pytest.raises(ValueError, match=r"task_001\.ckpt.* is corrupt.*delete it to resume from the one before") as e:
        run(finished, never_trains(), resume=True)
    assert "\n" not in str(e.value)
    newest.unlink()  # as the message says: the run resumes from task 0's checkpoint and trains task 1 again
    run(finished, resume=True)
    assert torch.load(newest, weights_only=True)["task_index"] == 1


def test_cil_run_resume_exits_1_in_one_line_on_a_corrupt_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, tiny = ROOT / "configs/experiments/quickstart_finetune.yaml", ROOT / "tests/data/tiny_overrides.yaml"
    command = ["run", "--config", str(config), "--config", str(tiny), "--method", "simplecil", "--out", str(tmp_path)]
    assert main(command) == 0
    flip_a_tensor_byte(tmp_path / "checkpoints" / "task_001.ckpt")
    capsys.readouterr()
    assert main([*command, "--resume", "true"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "task_001.ckpt" in error and "is corrupt" in error and "delete it" in error


def test_a_checkpoint_written_before_checksums_resumes_with_a_warning(
    finished: Path, caplog: pytest.LogCaptureFixture
) -> None:
    newest = finished / "checkpoints" / "task_001.ckpt"
    state = torch.load(newest, weights_only=True)
    del state["sha256"]
    torch.save(state, newest)
    with caplog.at_level(logging.WARNING, logger="cil.engine"):
        run(finished, never_trains(), resume=True)
    assert "predates checkpoint checksums" in caplog.text and "task_001.ckpt" in caplog.text


def test_a_finished_run_resumed_rebuilds_its_deleted_results_files(finished: Path) -> None:
    written = {name: (finished / name).read_bytes() for name in RESULTS_FILES}
    for name in RESULTS_FILES:
        (finished / name).unlink()
    run(finished, never_trains(), resume=True)
    for name in RESULTS_FILES:  # byte for byte: the summary's times come from the checkpoint's task costs
        assert (finished / name).read_bytes() == written[name], name
    times = {name: (finished / name).stat().st_mtime_ns for name in RESULTS_FILES}
    (finished / "summary.json").write_text("{")  # damaged
    run(finished, never_trains(), resume=True)
    assert (finished / "summary.json").read_bytes() == written["summary.json"]
    for name in RESULTS_FILES:  # intact files are left as they are (a sweep's finished seeds keep their times)
        if name != "summary.json":
            assert (finished / name).stat().st_mtime_ns == times[name], name


def _simplecil(seed: int = 0, source: str = "a named source") -> Any:
    """SimpleCIL on the tiny ViT, its weights marked as loaded from ``source`` ("random": not)."""
    from cil.method import create_method

    torch.manual_seed(seed)
    backbone = tiny_backbone()
    backbone.weights = source
    return create_method("simplecil", backbone)


def _engine_run(out: Path, method: Any, **kwargs: Any) -> Engine:
    return run_engine(out, method, tiny_stream(), **kwargs)


def test_unchanged_weights_are_stored_by_digest_and_resume_fills_them_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cil._unchanged_weights.MIN_BYTES", 1024)  # the tiny ViT's larger tensors count as large
    reference = _engine_run(tmp_path / "reference", _simplecil())
    state = torch.load(tmp_path / "reference" / "checkpoints" / "task_004.ckpt", weights_only=True)
    referenced = state["unchanged_weights"]
    assert "backbone.model.blocks.0.mlp.fc1.weight" in referenced  # the frozen backbone: not stored
    assert not referenced.keys() & state["method"]["weights"].keys()
    assert "head.prototypes" in state["method"]["weights"]  # changed by every task: stored

    with pytest.raises(RuntimeError, match="simulated crash"):
        _engine_run(tmp_path / "crashed", crash_during(_simplecil(), 3))
    resumed = _engine_run(tmp_path / "crashed", _simplecil(), resume=True)
    np.testing.assert_array_equal(resumed.accuracy_matrix(), reference.accuracy_matrix())

    other = _simplecil(seed=1)  # the config now builds other backbone weights
    with pytest.raises(ValueError, match="builds other values"):
        _engine_run(tmp_path / "crashed", other, resume=True)

    _engine_run(tmp_path / "random", _simplecil(source="random"))
    state = torch.load(tmp_path / "random" / "checkpoints" / "task_004.ckpt", weights_only=True)
    assert not state["unchanged_weights"]  # random weights are stored: a rebuilt method need not share the RNG


def test_weights_changed_behind_autograd_are_stored_in_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cil._unchanged_weights.MIN_BYTES", 1024)
    method = _simplecil()
    original = method.after_task

    def after_task(task: Any, features: Any) -> None:
        original(task, features)
        method.backbone.model.blocks[0].mlp.fc1.weight.data.mul_(0.5)  # an EMA-style update: no version bump

    method.after_task = after_task  # type: ignore[method-assign]
    _engine_run(tmp_path / "run", method)
    state = torch.load(tmp_path / "run" / "checkpoints" / "task_000.ckpt", weights_only=True)
    stored = state["method"]["weights"]["backbone.model.blocks.0.mlp.fc1.weight"]
    assert torch.equal(stored, method.backbone.model.blocks[0].mlp.fc1.weight * 2**4)  # halved 5 times, 1 at task 0
    assert "backbone.model.blocks.0.mlp.fc1.weight" not in state["unchanged_weights"]
