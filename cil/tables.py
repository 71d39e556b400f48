"""Paper tables from run directories: mean ± std over seeds, the number of seeds, best per column in bold.

The layout follows the method papers' main tables (e.g. MOS Table 1): one row per method, one column group per
dataset / stream with Ā and A_last under it. Rows and column groups can be any ``summary.json`` key or any key of
the run's resolved config (``config.method.init_args.merge``), so ablation tables come out of the same call::

    cil table runs/sweep --rows method --cols stream --metrics avg_incremental_acc last_acc --format markdown

Aggregation is ``groupby``/``pivot_table``; rendering is ``DataFrame.to_markdown`` (tabulate) and
``Styler.to_latex``. ``--compare-paper`` adds, under each of our rows, the numbers the paper reports for the same
config (the ``reported:`` block of the configs in ``configs/paper/``, copied into each run's ``config.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

__all__ = ["METRICS", "TableSpec", "aggregate", "render"]

# summary key -> (header label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "avg_incremental_acc": ("Ā", True),
    "last_acc": ("A_last", True),
    "avg_forgetting": ("Forgetting", False),
    "bwt": ("BWT", True),
    "fwt": ("FWT", True),
    "wall_s": ("Time (s)", False),
    "fit_s": ("Fit (s)", False),
    "trainable_params": ("Trainable params", False),
    "train_images_per_s": ("Train img/s", True),
    "eval_images_per_s": ("Eval img/s", True),
}

OURS, PAPER = "cil", "paper"


@dataclass(frozen=True)
class TableSpec:
    """What goes where: ``rows`` and ``cols`` are summary / ``config.*`` columns, ``metrics`` summary keys."""

    rows: Sequence[str] = ("method",)
    cols: Sequence[str] = ("stream",)
    metrics: Sequence[str] = ("avg_incremental_acc", "last_acc")

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("a table needs at least one --rows key (e.g. method)")


def aggregate(summaries: pd.DataFrame, spec: TableSpec, compare_paper: bool = False) -> pd.DataFrame:
    """Long frame: one row per (rows..., cols..., source, metric) with ``mean``, ``std`` (over seeds) and ``n``.

    ``summaries`` is :func:`cil.results.load_summaries` (``with_config=True`` for ``config.*`` keys and for
    ``compare_paper``). Runs that differ only in their seed fall into one group.
    """
    keys = [*spec.rows, *spec.cols]
    missing = [key for key in [*keys, *spec.metrics] if key not in summaries.columns]
    if missing:
        known = ", ".join(sorted(c for c in summaries.columns if not c.startswith("config.reported")))
        raise KeyError(f"no column {', '.join(map(repr, missing))} in the runs' summaries; known: {known}")
    frame = summaries.copy()
    frame[keys] = frame[keys].astype(str)  # None / NaN in a config key become a group of their own
    long = frame.melt(id_vars=keys, value_vars=list(spec.metrics), var_name="metric", value_name="value")
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    grouped = long.groupby([*keys, "metric"], sort=False)["value"]
    stats = grouped.agg(mean="mean", std="std", n="count").reset_index().assign(source=OURS)
    if compare_paper:
        stats = pd.concat([stats, _reported(frame, keys, spec.metrics)], ignore_index=True)
    return stats[[*keys, "source", "metric", "mean", "std", "n"]]


def _reported(frame: pd.DataFrame, keys: list[str], metrics: Sequence[str]) -> pd.DataFrame:
    """The paper's numbers of each group, from the ``reported:`` block of its runs' configs."""
    rows = []
    for metric in metrics:
        column = f"config.reported.{metric}"
        if column not in frame.columns:
            continue
        values = frame[[*keys, column]].dropna(subset=[column]).groupby(keys, sort=False)[column].first()
        for group, value in values.items():
            group = group if isinstance(group, tuple) else (group,)
            rows.append({**dict(zip(keys, group, strict=True)), "metric": metric, "mean": float(value), "n": 0})
    return pd.DataFrame(rows, columns=[*keys, "metric", "mean", "std", "n"]).assign(source=PAPER)


def render(stats: pd.DataFrame, spec: TableSpec, fmt: str = "markdown", decimals: int = 2) -> str:
    """The table of :func:`aggregate` as markdown, LaTeX (booktabs) or CSV (the long numeric frame)."""
    if fmt == "csv":
        return stats.to_csv(index=False)
    if fmt not in ("markdown", "latex"):
        raise ValueError(f"unknown table format {fmt!r}; use markdown, latex or csv")
    stats = stats.copy()
    best = _best(stats, spec)
    plus_minus, bold = (" ± ", "**{}**") if fmt == "markdown" else (r" $\pm$ ", r"\textbf{{{}}}")

    def cell(row: pd.Series) -> str:
        if pd.isna(row["mean"]):
            return "-"
        text = f"{row['mean']:.{decimals}f}"
        if row["n"] > 1 and not math.isnan(row["std"]):
            text += f"{plus_minus}{row['std']:.{decimals}f}"
        return bold.format(text) if row.name in best else text

    stats["cell"] = stats.apply(cell, axis=1)
    index = [*spec.rows, "source"] if (stats["source"] == PAPER).any() else list(spec.rows)
    stats["metric"] = stats["metric"].map(lambda m: METRICS.get(m, (m, True))[0])
    columns = [*spec.cols, "metric"]
    table = stats.pivot_table(index=index, columns=columns, values="cell", aggfunc="first", sort=False)
    table = table.reindex(columns=pd.MultiIndex.from_frame(stats[columns].drop_duplicates()))
    seeds = stats[stats["source"] == OURS].groupby(list(spec.rows), sort=False)["n"].agg(["min", "max"])
    n_seeds = seeds.apply(lambda r: str(r["min"]) if r["min"] == r["max"] else f"{r['min']}-{r['max']}", axis=1)
    if fmt == "markdown":
        flat = table.copy()
        flat.columns = [" ".join(str(part) for part in column) for column in table.columns]
        flat = flat.reset_index()
        flat["seeds"] = [n_seeds.get(_row_key(r, spec.rows), "") for _, r in flat.iterrows()]
        if "source" in flat.columns:
            flat.loc[flat["source"] == PAPER, "seeds"] = ""
        return flat.astype(object).where(flat.notna(), "-").to_markdown(index=False)
    table[("", "seeds")] = [
        n_seeds.get(_row_key(dict(zip(index, key, strict=True)), spec.rows), "") for key in _keys(table)
    ]
    styler = table.astype(object).where(table.notna(), "-").style
    return styler.to_latex(hrules=True, multicol_align="c", column_format="l" * len(index) + "c" * table.shape[1])


def _best(stats: pd.DataFrame, spec: TableSpec) -> set[int]:
    """Index labels of the best of our cells in every (cols..., metric) column."""
    ours = stats[(stats["source"] == OURS) & stats["mean"].notna()]
    best: set[int] = set()
    for (*_, metric), group in ours.groupby([*spec.cols, "metric"], sort=False):
        higher = METRICS.get(str(metric), (metric, True))[1]
        target = group["mean"].max() if higher else group["mean"].min()
        if len(group) > 1:
            best.update(group.index[group["mean"] == target])
    return best


def _keys(table: pd.DataFrame) -> list[tuple[object, ...]]:
    return [key if isinstance(key, tuple) else (key,) for key in table.index]


def _row_key(row: object, rows: Sequence[str]) -> object:
    values = tuple(row[key] for key in rows)  # type: ignore[index]
    return values if len(values) > 1 else values[0]
