"""Checkpoints without the weights a run never changed.

A method's checkpoint after every task used to hold its whole ``state_dict``, the frozen pre-trained backbone
included: 88 MB per task for a ViT-S, a sixth of SimpleCIL's wall time on 2 CPU cores. The tensors that still hold
the values the run started with are the ones the config builds again on resume, so a checkpoint stores each of
them as the SHA-256 of its bytes instead; resuming fills them in from the freshly built method after checking
that every digest matches (other weights, from a changed checkpoint file or another timm version, are refused).

Only the weights of backbones loaded from a named source (timm's pre-trained weights, a checkpoint file, an offline
source: not ``weights == "random"``) are referenced, and only tensors of at least :data:`MIN_BYTES`: random
weights and small tensors are cheap to store or depend on the RNG state the method was built in, which a method
rebuilt for analysis need not share. "Unchanged" is decided by content, not by ``tensor._version``:
``p.data.mul_()`` (an EMA update) changes a tensor without bumping its version.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cil.results import content_sha256

__all__ = ["MIN_BYTES", "UnchangedWeights"]

MIN_BYTES = 256 * 1024


class UnchangedWeights:
    """Digests of a freshly built method's large pre-trained tensors, to strip those still unchanged from its
    checkpoints."""

    def __init__(self, method: nn.Module) -> None:
        from cil.backbones import Backbone

        state = method.state_dict()
        sources = [
            f"{name}." if name else ""
            for name, module in method.named_modules()
            if isinstance(module, Backbone) and module.weights != "random"
        ]
        self.digests = {
            key: content_sha256(value)
            for key, value in state.items()
            if key.startswith(tuple(sources))  # nothing when no backbone has named weights
            and isinstance(value, torch.Tensor)
            and value.numel() * value.element_size() >= MIN_BYTES
        }
        self._fresh = state

    def strip(self, weights: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """``weights`` without the tensors that hold their starting values, and those tensors' digests."""
        kept, references = {}, {}
        for key, value in weights.items():
            digest = self.digests.get(key)
            if digest is not None and isinstance(value, torch.Tensor) and content_sha256(value) == digest:
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
