"""A persistent cache of frozen embeddings on disk, shared by runs, seeds and methods (``--feature_cache DIR``).

A seed sweep of a prototype method re-embeds the same images in every run: the class order changes which task an
image falls in, not its embedding. So every image's embedding is stored under two keys:

* the **embedding**: a digest of the weights that make it (:meth:`cil.method.CILMethod.embedding_module`), the
  function that applies them, the evaluation transform (input size, mean, std), the precision, device type, memory
  layout and compile setting, and the torch version;
* the **image**: a digest of its pixels (in-memory arrays), or of its file's path, size and modification time
  (image folders), read without decoding.

A run looks up each image of a dataset, embeds only those it does not find and adds them as a new shard. A changed
transform, weights file or image is a different key, so it is recomputed, never served stale.

Layout: ``DIR/<embedding digest>/<shard digest>.safetensors``; a shard holds ``sample_keys`` (``uint8 [N, 32]``) and
``embeddings`` (``float32 [N, D]``), and its metadata repeats the embedding's description. Shards are written to
a temporary file and renamed, and named by their content, so two runs writing at once leave only complete files.
A shard whose description differs from its folder's or that cannot be read is skipped with a warning (its images
are recomputed). safetensors files hold tensors only: reading one runs no code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from cil.data import ArrayDataset
from cil.results import atomic_write_bytes, content_sha256
from cil.task import LabelMapped, stored_targets

__all__ = ["FeatureStore", "embedding_digest", "sample_keys"]

log = logging.getLogger(__name__)

FORMAT = 1
_KEY_BYTES = 32  # SHA-256

Embed = Callable[[Dataset[Any]], tuple[torch.Tensor, torch.Tensor]]


def _canonical(description: dict[str, Any]) -> str:
    """An embedding's description as canonical JSON: what a folder's name hashes and every shard repeats."""
    return json.dumps(description, sort_keys=True, default=str)


def embedding_digest(description: dict[str, Any]) -> str:
    """The folder name of an embedding: SHA-256 of its description (canonical JSON), 32 hex digits."""
    return hashlib.sha256(_canonical(description).encode()).hexdigest()[:32]


def _array_key(image: Any) -> bytes:
    return bytes.fromhex(content_sha256(np.asarray(image)))  # dtype, shape and pixels


def _file_key(path: str) -> bytes:
    stat = os.stat(path)
    return hashlib.sha256(f"file {os.path.realpath(path)}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).digest()


def sample_keys(
    dataset: Dataset[Any], memo: dict[int, tuple[Dataset[Any], list[bytes] | None]] | None = None
) -> list[bytes] | None:
    """One 32-byte identity per sample of ``dataset`` without decoding any image, or None where the dataset does
    not tell one cheaply (its embeddings are then computed as without the cache).

    Subsets (:class:`~cil.task.LabelMapped`, ``torch.utils.data.Subset``) take their parent's keys; in-memory
    arrays (:class:`~cil.data.ArrayDataset`, torchvision's CIFAR / MNIST ``data``) hash their pixels; datasets of
    files (``samples`` as ``(path, label)``: ImageFolder) hash each file's real path, size and modification time.
    A dataset with a ``sample_keys()`` method gives its own (Hugging Face datasets: the dataset's fingerprint, HF's
    id of its content and history, and the row).
    A dataset with its own ``transform`` set is not keyed: its images are not what the key would describe.

    ``memo`` keeps the keys of the datasets subsets share (every task of a stream is a subset of the same few), so
    a run hashes each image once, not once per task.
    """
    if isinstance(dataset, (LabelMapped, Subset)):
        parent = sample_keys(dataset.dataset, memo)
        return None if parent is None else [parent[i] for i in dataset.indices]
    if memo is not None:
        if id(dataset) not in memo:  # the dataset is kept with its keys, so its id stays its own
            memo[id(dataset)] = (dataset, sample_keys(dataset))
        return memo[id(dataset)][1]
    if getattr(dataset, "transform", None) is not None:
        return None
    own = getattr(dataset, "sample_keys", None)
    if callable(own):  # a dataset that names its own samples (streams.hf.HFImages: HF's fingerprint and the row)
        return own()
    if isinstance(dataset, ArrayDataset):
        return [_array_key(image) for image in dataset.images]
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and all(isinstance(s, tuple) and isinstance(s[0], str) for s in samples[:1]):
        return [_file_key(path) for path, *_ in samples]
    data = getattr(dataset, "data", None)
    if isinstance(data, (np.ndarray, torch.Tensor)) and len(data) == len(dataset):  # type: ignore[arg-type]
        return [_array_key(image) for image in data]
    return None


class FeatureStore:
    """The cache in ``root``: :meth:`embed` returns a dataset's embeddings, computing only the missing ones.

    Each embedding's shards are read once per store (a store lives for one run); shards other runs write later are
    not seen by it, which only costs a recomputation.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"feature_cache {str(self.root)!r} is a file; give a folder (it is created if missing)")
        self._indexes: dict[str, dict[bytes, torch.Tensor]] = {}
        self._keys: dict[int, tuple[Dataset[Any], list[bytes] | None]] = {}  # sample_keys' memo, for this run
        self.hits = 0
        self.misses = 0

    def embed(
        self, description: dict[str, Any], dataset: Dataset[Any], compute: Embed
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(embeddings [N, D], labels [N])`` of ``dataset`` under the embedding ``description``; the images not in
        the cache go through ``compute`` (a subset of ``dataset``) and are added. None where the dataset has no
        cheap sample keys or integer labels (the caller computes as without a cache)."""
        keys = sample_keys(dataset, self._keys)
        labels = stored_targets(dataset)
        if keys is None or labels is None or len(keys) != len(labels):
            return None
        folder = embedding_digest(description)
        index = self._index(folder, description)
        missing = [i for i, key in enumerate(keys) if key not in index]
        if missing:
            computed, _ = compute(Subset(dataset, missing))  # [M, D]
            computed = computed.float().contiguous()
            self._write(folder, description, [keys[i] for i in missing], computed)
            index.update(zip((keys[i] for i in missing), computed, strict=True))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if not keys:
            return torch.zeros(0, 0), torch.as_tensor(labels, dtype=torch.long)
        return torch.stack([index[key] for key in keys]), torch.as_tensor(labels, dtype=torch.long)

    def _index(self, folder: str, description: dict[str, Any]) -> dict[bytes, torch.Tensor]:
        index = self._indexes.get(folder)
        if index is not None:
            return index
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        index = {}
        expected = _canonical(description)
        for shard in sorted((self.root / folder).glob("*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    if (handle.metadata() or {}).get("embedding") != expected:
                        log.warning("feature cache: %s describes another embedding; skipped (recomputed)", shard)
                        continue
                    keys, embeddings = handle.get_tensor("sample_keys"), handle.get_tensor("embeddings")
            except (SafetensorError, OSError, KeyError, ValueError) as error:
                log.warning("feature cache: cannot read %s (%s); skipped (recomputed)", shard, error)
                continue
            if keys.ndim != 2 or keys.shape[1] != _KEY_BYTES or len(keys) != len(embeddings):
                log.warning("feature cache: %s is malformed; skipped (recomputed)", shard)
                continue
            index.update(zip((bytes(row) for row in keys.numpy()), embeddings, strict=True))
        self._indexes[folder] = index
        return index

    def _write(self, folder: str, description: dict[str, Any], keys: list[bytes], embeddings: torch.Tensor) -> None:
        from safetensors.torch import save

        tensors = {
            "sample_keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(-1, _KEY_BYTES),
            "embeddings": embeddings,
        }
        data = save(tensors, metadata={"embedding": _canonical(description)})
        path = self.root / folder / f"{hashlib.sha256(data).hexdigest()[:32]}.safetensors"
        if not path.exists():
            atomic_write_bytes(path, data)
