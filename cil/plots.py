"""Figures of continual-learning runs: forgetting curves, the accuracy matrix, Ā-per-step and old-vs-new accuracy.

Every function draws on a matplotlib ``Axes`` (``ax=None`` makes a new figure) and takes the long results frame
of :func:`cil.results.load_runs`, so the same call works in a notebook and behind ``cil plot``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cil import metrics
from cil.results import accuracy_matrix

__all__ = [
    "accuracy_heatmap",
    "forgetting_curves",
    "old_new_accuracy",
    "overview",
    "seen_accuracy_curves",
    "seen_accuracy_per_step",
    "selected_ranks_heatmap",
]


def _axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt  # only here: a notebook then shows the new figure inline

    return plt.subplots(figsize=(5.5, 4), layout="constrained")[1]


def _one_run(results: pd.DataFrame) -> pd.DataFrame:
    if "run" in results.columns and results["run"].nunique() > 1:
        raise ValueError("this plot shows one run; select one, e.g. runs[runs.run == runs.run.iloc[0]]")
    return results


def _title(results: pd.DataFrame) -> str:
    return f"{results['method'].iloc[0]} on {results['stream'].iloc[0]} (seed {results['seed'].iloc[0]})"


def forgetting_curves(results: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Accuracy on each task (one line per task, from the step it was learned) across the stream of one run."""
    ax = _axes(ax)
    results = _one_run(results)
    R = accuracy_matrix(results)
    steps = np.arange(R.shape[0])
    colors = _colors(R.shape[1])
    for task in range(R.shape[1]):
        ax.plot(steps[task:], R[task:, task], marker="o", ms=3, color=colors[task], label=f"task {task}")
    ax.set(xlabel="after training task", ylabel="accuracy on task (%)", title=_title(results), ylim=(0, 101))
    ax.set_xticks(steps)
    ax.legend(fontsize="small", ncols=2 if R.shape[1] > 6 else 1)
    return ax


def accuracy_heatmap(results: pd.DataFrame, ax: Axes | None = None, annotate: bool = True) -> Axes:
    """The accuracy matrix ``R[i, j]`` of one run as an image (rows: after task i; columns: task j)."""
    ax = _axes(ax)
    results = _one_run(results)
    R = accuracy_matrix(results)
    image = ax.imshow(np.ma.masked_invalid(R), vmin=0, vmax=100, cmap="viridis")
    ax.figure.colorbar(image, ax=ax, label="accuracy (%)")
    if annotate and R.shape[0] <= 12:
        for (i, j), value in np.ndenumerate(R):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8, color="w" if value < 60 else "k")
    ax.set(xlabel="evaluated task j", ylabel="after training task i", title=_title(results))
    ax.set_xticks(range(R.shape[1]))
    ax.set_yticks(range(R.shape[0]))
    return ax


def selected_ranks_heatmap(ranks: pd.DataFrame, ax: Axes | None = None, annotate: bool = True) -> Axes:
    """The rank each LoRA layer kept, per task (rows: layers, columns: tasks), from :func:`cil.selected_ranks`."""
    ax = _axes(ax)
    grid = ranks.pivot(index="layer", columns="task", values="rank")
    grid = grid.loc[sorted(grid.index, key=_layer_order)]
    image = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", vmin=0, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [str(t) for t in grid.columns])
    ax.set_yticks(range(grid.shape[0]), list(grid.index), fontsize=6)
    if annotate and grid.size <= 400:
        for (row, col), value in np.ndenumerate(grid.to_numpy()):
            ax.text(col, row, str(int(value)), ha="center", va="center", fontsize=5, color="white")
    ax.set(xlabel="after task", title="selected LoRA rank per layer")
    ax.figure.colorbar(image, ax=ax, fraction=0.04)
    return ax


def _layer_order(layer: str) -> tuple[int, str]:
    """``blocks.10.attn.qkv.q`` after ``blocks.9.mlp.fc2``: by block number, then name."""
    parts = layer.split(".")
    number = next((int(p) for p in parts if p.isdigit()), -1)
    return number, layer


def seen_accuracy_per_step(runs: pd.DataFrame) -> pd.DataFrame:
    """Accuracy on all seen classes after each step (test images pooled), one row per (run, step); the scores of
    tasks not trained yet and of the zero-shot baseline (``--evaluate_future``) are not part of it."""
    runs = runs[runs["eval_task"] <= runs["train_task"]]
    runs = runs.assign(n_hit=runs["accuracy"] * runs["n_test"] / 100.0)  # also for mAP rows, which have no n_correct
    pooled = runs.groupby(["run", "method", "stream", "seed", "train_task"], sort=False)[["n_hit", "n_test"]].sum()
    pooled["seen_accuracy"] = 100.0 * pooled["n_hit"] / pooled["n_test"]
    return pooled.reset_index()


def seen_accuracy_curves(runs: pd.DataFrame, label: str = "method", ax: Axes | None = None) -> Axes:
    """Accuracy on the seen classes per step, one line per ``label`` value: mean over its runs (seeds), ± std band."""
    ax = _axes(ax)
    per_step = seen_accuracy_per_step(runs)
    if label not in per_step.columns:
        per_step = per_step.merge(runs[["run", label]].drop_duplicates(), on="run")
    several_streams = per_step["stream"].nunique() > 1  # never average one method's curves over different streams
    keys = [label, "stream"] if several_streams and label != "stream" else [label]
    for key, group in per_step.groupby(keys, sort=False):
        name = " / ".join(map(str, key)) if isinstance(key, tuple) else str(key)
        curve = group.groupby("train_task")["seen_accuracy"].agg(["mean", "std", "count"])
        n = int(curve["count"].max())
        (line,) = ax.plot(curve.index, curve["mean"], marker="o", ms=3, label=f"{name} (n={n})" if n > 1 else name)
        if n > 1:
            std = curve["std"].fillna(0)
            ax.fill_between(curve.index, curve["mean"] - std, curve["mean"] + std, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="after training task", ylabel="accuracy on seen classes (%)", ylim=(0, 101))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Ā is the mean of each curve")
    ax.legend(fontsize="small")
    return ax


def old_new_accuracy(results: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Accuracy on the old (earlier tasks') and the new (current task's) classes after each step of one run."""
    ax = _axes(ax)
    results = _one_run(results)
    R = accuracy_matrix(results)
    n_test = results.groupby("eval_task")["n_test"].first().reindex(range(R.shape[1])).to_numpy(dtype=float)
    old, new = metrics.old_new_accuracy(R, n_test)
    steps = np.arange(R.shape[0])
    ax.plot(steps, new, marker="o", ms=3, label="new classes")
    ax.plot(steps, old, marker="s", ms=3, label="old classes")
    ax.set(xlabel="after training task", ylabel="accuracy (%)", title=_title(results), ylim=(0, 101))
    ax.set_xticks(steps)
    ax.legend(fontsize="small")
    return ax


def overview(runs: pd.DataFrame, label: str = "method") -> Figure:
    """Four panels: Ā-per-step of every run group, then forgetting curves, heatmap and old/new of the first run."""
    figure = Figure(figsize=(12, 8.5), layout="constrained")
    axes = figure.subplots(2, 2)
    first = runs[runs["run"] == runs["run"].iloc[0]] if "run" in runs.columns else runs
    seen_accuracy_curves(runs, label=label, ax=axes[0, 0])
    forgetting_curves(first, ax=axes[0, 1])
    accuracy_heatmap(first, ax=axes[1, 0])
    old_new_accuracy(first, ax=axes[1, 1])
    return figure


def _colors(count: int) -> Sequence[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis" if count > 10 else "tab10"]
    return [cmap(i / max(count - 1, 1)) if count > 10 else cmap(i) for i in range(count)]
