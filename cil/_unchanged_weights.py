"""Checkpoints without the weights a run never changed.

A method's checkpoint after every task used to hold its whole ``state_dict``, the frozen pre-trained backbone
included: 88 MB per task for a ViT-S, a sixth of SimpleCIL's wall time on 2 CPU cores. The tensors that still hold
the values the run started with are the ones the config builds again on resume, so a checkpoint stores each of
them as the SHA-256 of its bytes instead; resuming fills them in from the freshly built method after checking
that every digest matches (other weights, from a changed checkpoint file or another timm version, are refused).

"Unchanged" is decided by content, not by ``tensor._version``: ``p.data.mul_()`` (EMA updates) changes a tensor
without bumping its version. Only tensors of at least :data:`MIN_BYTES` are referenced: small ones (heads,
adapters freshly initialised from the RNG) are cheap to store and would otherwise tie resuming to the RNG state in
which the method was built.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["MIN_BYTES", "UnchangedWeights"]

MIN_BYTES = 256 * 1024


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(f"{tensor.dtype} {tuple(tensor.shape)}\n".encode() + data.tobytes()).hexdigest()


class UnchangedWeights:
    """Digests of a freshly built method's large tensors, to strip those still unchanged from its checkpoints."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.digests = {
            key: _digest(value)
            for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.numel() * value.element_size() >= MIN_BYTES
        }
        self._fresh = state

    def strip(self, weights: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """``weights`` without the tensors that hold their starting values, and those tensors' digests."""
        kept, references = {}, {}
        for key, value in weights.items():
            digest = self.digests.get(key)
            if digest is not None and isinstance(value, torch.Tensor) and _digest(value) == digest:
                references[key] = digest
            else:
                kept[key] = value
        return kept, references

    def fill(self, weights: dict[str, Any], references: dict[str, str], source: str) -> dict[str, Any]:
        """``weights`` with every referenced tensor taken from the freshly built method; refuses a mismatch."""
        changed = sorted(key for key, digest in references.items() if self.digests.get(key) != digest)
        if changed:
            raise ValueError(
                f"{source} stores {len(references)} unchanged weights by digest, but this config builds other values "
                f"for {len(changed)} of them (e.g. {changed[0]!r}): resume with the weights the run started with "
                "(same backbone source / checkpoint file and timm version)"
            )
        return {**weights, **{key: self._fresh[key] for key in references}}
