"""The persistent feature cache: reuse across runs and class orders, and a miss for every change of what makes an
embedding (transform, weights, image)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from cil.data import ArrayDataset, image_folder
from cil.feature_cache import FeatureStore, embedding_digest, sample_keys
from cil.method import create_method
from cil.task import LabelMapped
from tests.conftest import TINY_VIT, run_engine, tiny_backbone, tiny_stream

DESCRIPTION = {"weights": "abc", "transform": "resize 16"}


def _simplecil_run(out: Path, cache: Path, stream_seed: int = 0, **backbone: Any) -> Any:
    method = create_method("simplecil", tiny_backbone() if not backbone else _backbone(**backbone))
    return run_engine(out, method, tiny_stream(seed=stream_seed), feature_cache=cache)


def _backbone(**overrides: Any) -> Any:
    from cil.backbones import Backbone

    return Backbone(**{**TINY_VIT, **overrides})


def _embedded(engine: Any) -> int:
    """Images the run had to embed (train and test): the ones not found in the cache."""
    return int(engine.features.store.misses)


def test_a_second_run_with_another_class_order_reads_every_embedding_and_scores_the_same(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = _simplecil_run(tmp_path / "a", tmp_path / "cache")
    assert _embedded(first) == 5 * 2 * (40 + 15)  # every train and test image, once
    torch.manual_seed(0)  # the same random tiny ViT
    second = _simplecil_run(tmp_path / "b", tmp_path / "cache", stream_seed=1)
    assert _embedded(second) == 0 and sum(cost["train_images"] for cost in second.task_costs) == 0
    assert second.features.store.hits == 5 * 2 * (40 + 15) and second.features.store.misses == 0
    torch.manual_seed(0)
    plain = run_engine(tmp_path / "c", create_method("simplecil", tiny_backbone()), tiny_stream(seed=1))
    np.testing.assert_array_equal(second.accuracy_matrix(), plain.accuracy_matrix())


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"input_size": 12, "model_kwargs": {**TINY_VIT["model_kwargs"], "img_size": 12}}, id="input-size"),
        pytest.param({"mean": [0.1, 0.2, 0.3]}, id="normalisation"),
        pytest.param({"channels_last": False}, id="layout"),
        pytest.param("weights", id="weights"),
    ],
)
def test_a_changed_transform_or_weights_embeds_every_image_again(tmp_path: Path, change: Any) -> None:
    torch.manual_seed(0)
    _simplecil_run(tmp_path / "a", tmp_path / "cache")
    torch.manual_seed(0 if change != "weights" else 1)
    again = _simplecil_run(tmp_path / "b", tmp_path / "cache", **({} if change == "weights" else change))
    assert _embedded(again) == 5 * 2 * (40 + 15)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one folder per embedding


class _Counting:
    """A ``compute`` for the store that embeds an image as its mean pixel and counts the images it was given."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, dataset: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
        self.images += len(items)
        embeddings = torch.tensor([[float(np.mean(image)), float(np.std(image))] for image, _ in items])
        return embeddings, torch.tensor([label for _, label in items])


def _arrays(n: int = 6) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.integers(0, 255, (n, 8, 8), dtype=np.uint8), [i % 3 for i in range(n)])


def test_only_the_changed_image_is_embedded_again(tmp_path: Path) -> None:
    data = _arrays()
    subset = LabelMapped(data, [5, 1, 3], {0: 10, 1: 11, 2: 12})
    compute = _Counting()
    first = FeatureStore(tmp_path).embed(DESCRIPTION, subset, compute)
    assert first is not None and compute.images == 3
    assert first[1].tolist() == [12, 11, 10]  # the subset's own (mapped) labels
    data.images[1] = 255 - data.images[1]
    again = _Counting()
    embeddings, _labels = FeatureStore(tmp_path).embed(DESCRIPTION, subset, again)  # type: ignore[misc]
    assert again.images == 1
    assert torch.equal(embeddings[[0, 2]], first[0][[0, 2]]) and not torch.equal(embeddings[1], first[0][1])
    assert torch.equal(embeddings, _Counting()(subset)[0])


def test_unreadable_or_foreign_shards_are_skipped_and_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _arrays()
    FeatureStore(tmp_path).embed(DESCRIPTION, data, _Counting())
    folder = tmp_path / embedding_digest(DESCRIPTION)
    (shard,) = folder.glob("*.safetensors")
    other = {**DESCRIPTION, "weights": "def"}
    foreign = tmp_path / embedding_digest(other) / shard.name
    foreign.parent.mkdir()
    foreign.write_bytes(shard.read_bytes())  # a shard of another embedding, copied into this one's folder
    shard.write_bytes(shard.read_bytes()[:40])  # truncated
    for description in (DESCRIPTION, other):
        compute = _Counting()
        with caplog.at_level(logging.WARNING, logger="cil.feature_cache"):
            result = FeatureStore(tmp_path).embed(description, data, compute)
        assert result is not None and compute.images == len(data)
    assert "cannot read" in caplog.text and "describes another embedding" in caplog.text


def test_file_keys_change_with_the_file_and_datasets_without_keys_are_not_cached(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / "images" / name / "x.png")
    folder = image_folder(tmp_path / "images")
    keys = sample_keys(folder)
    assert keys is not None and len(set(keys)) == 2  # same pixels, other files
    path = tmp_path / "images" / "a" / "x.png"
    Image.new("RGB", (4, 4), (11, 20, 30)).save(path)
    stat = path.stat()
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = sample_keys(folder)
    assert changed is not None and changed[0] != keys[0] and changed[1] == keys[1]

    class Plain(Dataset[Any]):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            return np.zeros((4, 4), np.uint8), i

    assert sample_keys(Plain()) is None
    assert FeatureStore(tmp_path / "cache").embed(DESCRIPTION, Plain(), _Counting()) is None


def test_a_file_given_as_the_cache_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        FeatureStore(tmp_path / "file")


def test_a_run_keys_each_image_once_however_many_tasks_share_its_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cil.feature_cache as feature_cache

    data = _arrays()
    hashed: list[int] = []
    original = feature_cache._array_key
    monkeypatch.setattr(feature_cache, "_array_key", lambda image: hashed.append(1) or original(image))
    store = FeatureStore(tmp_path)
    for rows in ([0, 1], [2, 3], [4, 5]):  # three tasks' subsets of one dataset
        store.embed(DESCRIPTION, Subset(data, rows), _Counting())
    assert len(hashed) == len(data)
