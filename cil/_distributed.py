"""Several processes, one answer: what the engine needs from ``torch.distributed`` under Lightning's DDP.

Lightning starts the processes (its DDP launcher, torchrun or SLURM) and shards every dataloader across them. For a
continual learner that is right for training (DDP averages the gradients) and wrong for everything computed from a
whole dataset: class prototypes, Gaussians, replay buffers, accuracy. So:

- predictions (embeddings for ``after_task``, logits for evaluation) are **gathered**: every rank predicts its shard,
  :class:`GatherPredictions` collects the shards and puts every row back at its dataset index, so every rank holds
  the same ``[N, ...]`` tensors a single process computes (Lightning's predict sampler does not pad, so nothing is
  counted twice);
- after every task, the method's state is **broadcast** from rank 0 (:func:`broadcast_state`): a method's own loops
  in ``after_task`` (MOS's alignment, FPF's inline steps) run on every rank from the same data and seed, but GPU
  kernels need not be bitwise deterministic, and rank 0 is the one that writes the checkpoint;
- counts (training images, FLOPs) are **summed** over ranks (:func:`sum_over_ranks`);
- only rank 0 writes the run directory and prints (:func:`is_rank_zero`).
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, also before Lightning has started the others (the rank then comes from
    the environment its launcher, torchrun or SLURM set; a process nobody launched is rank 0)."""
    if _initialized():
        return dist.get_rank() == 0
    return int(getattr(rank_zero_only, "rank", 0)) == 0


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GatherPredictions(BasePredictionWriter):
    """Collects the ``(outputs [B, ...], labels [B, ...])`` batches of a distributed ``trainer.predict`` from every
    rank into ``outputs [N, ...]`` and ``labels [N, ...]`` in dataset order, on the CPU of every rank."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")
        self.outputs: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        # the engine predicts one dataloader: Lightning then flattens the predictions ([batch]), not the indices
        # ([dataloader][batch][sample])
        if len(batch_indices) != 1 or len(batch_indices[0]) != len(predictions):
            raise RuntimeError("expected the batches and batch indices of exactly one predict dataloader")
        batch_indices = batch_indices[0]
        if not predictions:
            raise RuntimeError(f"rank {dist.get_rank()} was given no image to predict: fewer images than processes")
        device = trainer.strategy.root_device
        indices = torch.as_tensor([i for batch in batch_indices for i in batch], dtype=torch.long)  # [n_rank]
        outputs = torch.cat([b[0].float() for b in predictions])  # [n_rank, D or C]
        labels = torch.cat([torch.as_tensor(b[1]) for b in predictions])  # [n_rank] or [n_rank, L]
        if len(indices) != len(outputs):
            raise RuntimeError("Lightning reported batch indices that do not match the predicted batches")
        every = [_gather_rows(t.to(device)).cpu() for t in (indices, outputs, labels)]
        order = torch.argsort(every[0])
        if not torch.equal(every[0][order], torch.arange(len(order))):
            raise RuntimeError(
                f"the ranks predicted {len(order)} rows for {len(set(every[0].tolist()))} distinct dataset indices; "
                "expected every index exactly once"
            )
        self.outputs, self.labels = every[1][order], every[2][order]


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor [n_rank, ...]`` of every rank, concatenated in rank order; ranks may hold different numbers of rows
    (padded for the collective, trimmed after)."""
    world = dist.get_world_size()
    count = torch.tensor([len(tensor)], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    rows = [int(c) for c in counts]
    padded = torch.zeros((max(rows), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: len(tensor)] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:n] for part, n in zip(gathered, rows, strict=True)])


def sum_over_ranks(value: float, device: torch.device) -> float:
    """``value`` summed over every rank (each rank counted its own shard); ``value`` itself on one process."""
    if not _initialized():
        return value
    total = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total)


def sum_counts_over_ranks(counts: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Integer ``counts`` (e.g. images a method scored right on this rank's shard) summed over every rank."""
    if not _initialized():
        return counts
    total = counts.to(device=device, dtype=torch.long)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _initialized() else (0, 1)


def broadcast_state(module: torch.nn.Module) -> str | None:
    """Rank 0's ``state_dict`` (parameters, buffers and extra state such as a replay buffer) on every rank, checked:
    returns the :func:`state_digest` every rank then has (None on one process), and raises if any rank differs."""
    if not _initialized():
        return None
    state = None
    if dist.get_rank() == 0:  # on the CPU: pickled CUDA tensors would land on the sender's device number
        state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}
    box = [state]
    dist.broadcast_object_list(box, src=0)
    if dist.get_rank() != 0:
        assert box[0] is not None
        module.load_state_dict(box[0], strict=True)
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, state_digest(module))
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks hold different method states after the broadcast: digests {digests}")
    return digests[0]


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of the module's ``state_dict`` (tensor bytes in key order, extra state serialised): equal digests on
    two ranks mean bit-identical states."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            buffer = io.BytesIO()
            torch.save(value, buffer)
            digest.update(buffer.getvalue())
    return digest.hexdigest()
