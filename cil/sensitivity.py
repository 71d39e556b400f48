"""Which modules forget: per-module training dynamics over a continual run (Zhao et al., ICML 2023, Sec. 3).

Zhao et al. measure how much each module's parameters move between consecutive training epochs,
``change(m, t, n) = ||theta_m(t, n) - theta_m(t, n-1)||_1 / |theta_m|`` (epoch ``n`` of task ``t``; epoch 1 is
measured from the weights the previous task left), and find that a few modules (for CNNs: BatchNorm, the first
convolution, the classifier) change far more, and far more at task switches, than the shared rest. FPF finetunes
only those.

Here a *unit* is one module's own tensors (not its children's): its float parameters and float buffers, so a
BatchNorm's running mean and variance count, as they are the most task-specific state of a CNN. Parameters held
directly by the root (a ViT's ``cls_token`` and ``pos_embed``) are units of their own. A growing head is
compared on the classes it had before the epoch.

:class:`TrainingDynamics` accumulates the change frame; :class:`SensitivityRecorder` is the Lightning callback
that records a whole run (pass it in ``trainer.callbacks``; it writes ``OUT/sensitivity.csv`` after every fit);
:func:`rank_modules` turns the frame into the ranked list, and :func:`select_units` resolves the module choices
of FPF (groups such as ``norm`` / ``first_conv`` / ``head``, name patterns, or the ranking itself).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from cil.results import atomic_write_text

__all__ = [
    "GROUPS",
    "SensitivityRecorder",
    "TrainingDynamics",
    "module_units",
    "parameter_change",
    "rank_modules",
    "select_units",
    "unit_tensors",
    "units_of",
]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)

GROUPS = {
    "norm": "every normalisation layer (BatchNorm with its running statistics, LayerNorm, GroupNorm)",
    "first_conv": "the first convolution (a CNN's stem, a ViT's patch projection)",
    "head": "the method's classifier head",
    "patch_embed": "a ViT's patch embedding, position embedding and class token",
    "all": "every unit",
}
"""Named groups :func:`select_units` accepts beside name patterns."""


Unit = tuple[str, list[tuple[str, torch.Tensor]]]
"""``(kind, [(state key, tensor), ...])``: a unit's module class name and its tensors."""


def units_of(model: nn.Module) -> dict[str, Unit]:
    """Every unit of ``model`` (see the module doc), in module order.

    A composite module's own tensors (a ViT's ``cls_token`` and ``pos_embed``, held beside its blocks) are units one
    by one, of kind ``Parameter``; a module whose children hold nothing (timm's ``BatchNormAct2d``) is one unit."""
    units: dict[str, Unit] = {}
    for name, module in model.named_modules():
        own = _own_tensors(module)
        if not own:
            continue
        if any(any(True for _ in child.parameters()) or _own_tensors(child) for child in module.children()):
            units.update({_join(name, key): ("Parameter", [(_join(name, key), t)]) for key, t in own})
        else:
            units[name] = (type(module).__name__, [(_join(name, key), t) for key, t in own])
    return units


def module_units(model: nn.Module) -> dict[str, str]:
    """``{unit name: module class name}``."""
    return {name: kind for name, (kind, _) in units_of(model).items()}


def unit_tensors(model: nn.Module, unit: str) -> list[tuple[str, torch.Tensor]]:
    """``(state key, tensor)`` of a unit's parameters and float buffers."""
    units = units_of(model)
    if unit not in units:
        raise KeyError(f"{type(model).__name__} has no unit {unit!r}")
    return units[unit][1]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    tensors: list[tuple[str, torch.Tensor]] = list(module.named_parameters(recurse=False))
    tensors += [(k, b) for k, b in module.named_buffers(recurse=False) if b is not None and b.is_floating_point()]
    return tensors


def snapshot(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """A CPU copy of every unit's tensors."""
    return {u: [t.detach().float().cpu().clone() for _, t in tensors] for u, (_, tensors) in units_of(model).items()}


def parameter_change(before: dict[str, list[torch.Tensor]], after: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """``||after - before||_1 / |theta|`` per unit present in both, on the common leading slice of tensors that
    grew (a head)."""
    changes: dict[str, float] = {}
    for unit, old_tensors in before.items():
        if unit not in after:
            continue
        total, count = 0.0, 0
        for old, new in zip(old_tensors, after[unit], strict=True):
            if old.shape != new.shape:
                common = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, new.shape, strict=True))
                old, new = old[common], new[common]
            total += float((new - old).abs().sum())
            count += old.numel()
        if count:
            changes[unit] = total / count
    return changes


class TrainingDynamics:
    """Accumulates ``change(unit, task, epoch)`` from snapshots taken at task starts and epoch ends.

    Args:
        model: The module whose units are tracked (a method: backbone and head).
    """

    COLUMNS = ("task", "epoch", "unit", "kind", "params", "change")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows: list[dict[str, Any]] = []
        self._previous: dict[str, list[torch.Tensor]] | None = None
        self._task = -1
        self._epoch = 0

    def start_task(self, task: int) -> None:
        """The reference for epoch 1 of ``task`` is the model as the previous task (or pre-training) left it."""
        if task != self._task:
            self._task, self._epoch = task, 0
            self._previous = snapshot(self.model)

    def end_epoch(self) -> None:
        kinds = module_units(self.model)  # a growing method may have gained units since the task started
        current = snapshot(self.model)
        self._epoch += 1
        for unit, change in parameter_change(self._previous or {}, current).items():
            params = sum(t.numel() for t in current[unit])
            self.rows.append(
                {"task": self._task, "epoch": self._epoch, "unit": unit, "kind": kinds[unit], "params": params,
                 "change": change}
            )  # fmt: skip
        self._previous = current

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(self.COLUMNS))


def _task_index(module: nn.Module) -> int:
    """The task a method is training (a plain LightningModule counts as task 0)."""
    return int(getattr(module, "task_index", 0))


class SensitivityRecorder(Callback):
    """Records :class:`TrainingDynamics` of the method over a whole run and writes ``sensitivity.csv`` (the change
    frame) and ``sensitivity_rank.csv`` (:func:`rank_modules`) into the run directory after every fit.

    Use it from a config: ``trainer: {callbacks: [{class_path: cil.sensitivity.SensitivityRecorder}]}``. The engine
    gives every task's Trainer the same callback instance, so one recorder sees the whole stream. A resumed run
    keeps the rows of the tasks finished before the interruption.
    """

    def __init__(self) -> None:
        self.dynamics: TrainingDynamics | None = None
        self.out: Path | None = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.dynamics is None or self.dynamics.model is not module:
            self.dynamics = TrainingDynamics(module)
            self.out = Path(trainer.default_root_dir)
            earlier = self.out / "sensitivity.csv"
            if earlier.exists():  # a resumed run: keep the finished tasks' rows
                frame = pd.read_csv(earlier)
                finished = frame[frame["task"] < _task_index(module)]
                self.dynamics.rows = [{str(k): v for k, v in row.items()} for row in finished.to_dict("records")]
        self.dynamics.start_task(_task_index(module))

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        assert self.dynamics is not None
        self.dynamics.end_epoch()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        assert self.dynamics is not None and self.out is not None
        frame = self.dynamics.frame()
        atomic_write_text(self.out / "sensitivity.csv", frame.to_csv(index=False))
        atomic_write_text(self.out / "sensitivity_rank.csv", rank_modules(frame).to_csv(index=False))


def rank_modules(frame: pd.DataFrame, from_task: int = 1) -> pd.DataFrame:
    """Units ranked by their mean change per parameter over the epochs of tasks ``>= from_task`` (all tasks if
    the run has none: with one task there is no forgetting yet, only adaptation to the first task).

    Columns: ``rank, unit, kind, params, score`` (the mean change), ``boundary`` (the mean change over the first
    epoch of each task, the one that straddles the task switch) and ``boundary_ratio`` (``boundary / score``: above
    1 for units that move most right after the data changes, the paper's sign of task-specific modules).
    """
    if frame.empty:
        return pd.DataFrame(columns=["rank", "unit", "kind", "params", "score", "boundary", "boundary_ratio"])
    later = frame[frame["task"] >= from_task]
    rows = later if not later.empty else frame
    grouped = rows.groupby(["unit", "kind"], sort=False)
    ranked = grouped.agg(params=("params", "max"), score=("change", "mean")).reset_index()
    firsts = rows[rows["epoch"] == 1].groupby("unit")["change"].mean()
    ranked["boundary"] = ranked["unit"].map(firsts)
    ranked["boundary_ratio"] = ranked["boundary"] / ranked["score"]
    ranked = ranked.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    ranked.insert(0, "rank", range(1, len(ranked) + 1))
    return ranked


def select_units(model: nn.Module, choices: Sequence[str], ranking: pd.DataFrame | None = None) -> list[str]:
    """The units named by ``choices``: groups of :data:`GROUPS`, ``top:N`` (the first ``N`` units of ``ranking``)
    or ``fnmatch`` patterns over unit names (``blocks.11.*``) and classes (``type:LayerNorm``).

    Raises:
        ValueError: A choice selects nothing (a typo, or a group the architecture lacks), or ``top:N`` without a
            ranking.
    """
    units = module_units(model)
    modules = dict(model.named_modules())
    selected: list[str] = []
    for choice in choices:
        if choice == "all":
            matched = list(units)
        elif choice == "norm":
            matched = [u for u in units if isinstance(modules.get(u), _NORMS)]
        elif choice == "first_conv":
            convs = [u for u in units if isinstance(modules.get(u), nn.Conv2d)]
            matched = convs[:1]
        elif choice == "head":
            matched = [u for u in units if u == "head" or u.startswith("head.")]
        elif choice == "patch_embed":
            matched = [u for u in units if "patch_embed" in u or u.split(".")[-1] in {"cls_token", "pos_embed"}]
        elif choice.startswith("top:"):
            if ranking is None:
                raise ValueError(f"{choice!r} needs a sensitivity ranking (none recorded yet)")
            matched = [u for u in ranking["unit"].head(int(choice[4:])) if u in units]
        elif choice.startswith("type:"):
            matched = [u for u, kind in units.items() if fnmatch.fnmatchcase(kind, choice[5:])]
        else:
            matched = [u for u in units if fnmatch.fnmatchcase(u, choice)]
        if not matched:
            raise ValueError(
                f"module choice {choice!r} selects nothing in {type(model).__name__}; use a group "
                f"({', '.join(GROUPS)}), top:N, type:<Class> or a pattern over unit names such as "
                f"{', '.join(list(units)[:3])}"
            )
        selected.extend(u for u in matched if u not in selected)
    return selected
