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

# summary key -> (header label, LaTeX label, higher is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "avg_incremental_acc": ("Ā", r"$\bar{A}$", True),
    "last_acc": ("A_last", r"$A_{\mathrm{last}}$", True),
    "avg_forgetting": ("Forgetting", "Forgetting", False),
    "bwt": ("BWT", "BWT", True),
    "fwt": ("FWT", "FWT", True),
    "mtil_transfer": ("Transfer", "Transfer", True),
    "mtil_average": ("Average", "Average", True),
    "mtil_last": ("Last", "Last", True),
    "final_accuracy": ("Final acc", "Final acc", True),  # per task (cil table --per-task)
    "forgetting": ("Forgetting", "Forgetting", False),  # per task (cil table --per-task)
    "wall_s": ("Time (s)", "Time (s)", False),
    "fit_s": ("Fit (s)", "Fit (s)", False),
    "eval_s": ("Eval (s)", "Eval (s)", False),
    "trainable_params": ("Trainable params", "Trainable params", False),
    "total_params": ("Params", "Params", False),
    "train_images_per_s": ("Train img/s", "Train img/s", True),
    "eval_images_per_s": ("Eval img/s", "Eval img/s", True),
}
# Config keys that may differ between runs averaged into one cell (the seed, and what only steers or describes a run).
_SEED_LIKE = (
    *("config.seed_everything", "config.out", "config.resume", "config.logger", "config.keep_checkpoints"),
    *("config.feature_cache", "config.quiet", "config.count_flops"),
)
_DESCRIPTIVE_PREFIXES = (
    "config.reported", "config.trainer.enable_", "config.trainer.log_every_n_steps", "config.trainer.logger"
)  # fmt: skip

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


def aggregate(
    summaries: pd.DataFrame, spec: TableSpec, compare_paper: bool = False, one_per_seed: bool = False
) -> pd.DataFrame:
    """Long frame: one row per (rows..., cols..., source, metric) with ``mean``, ``std`` (over seeds) and ``n``.

    ``summaries`` is :func:`cil.results.load_summaries` (``with_config=True`` for ``config.*`` keys and for
    ``compare_paper``). Runs that differ only in their seed fall into one group; runs that repeat a seed within a
    group are refused, or with ``one_per_seed`` the first of them (by run directory) is kept.
    """
    keys = [*spec.rows, *spec.cols]
    missing = [key for key in [*keys, *spec.metrics] if key not in summaries.columns]
    if missing:
        known = ", ".join(sorted(c for c in summaries.columns if not c.startswith("config.reported")))
        raise KeyError(f"no column {', '.join(map(repr, missing))} in the runs' summaries; known: {known}")
    unknown = [m for m in spec.metrics if m not in METRICS]
    if unknown:
        raise KeyError(
            f"unknown metric(s) {unknown}: the table needs to know which direction is best; use {list(METRICS)}"
        )
    frame = summaries.copy()
    frame[keys] = frame[keys].astype(str)  # None / NaN in a config key become a group of their own
    if one_per_seed and "seed" in frame.columns:
        frame = frame.sort_values("run", kind="stable").drop_duplicates([*keys, "seed"], keep="first")
    _check_groups_differ_only_in_seed(frame, keys)
    long = frame.melt(id_vars=keys, value_vars=list(spec.metrics), var_name="metric", value_name="value")
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    grouped = long.groupby([*keys, "metric"], sort=False)["value"]
    stats = grouped.agg(mean="mean", std="std", n="count", runs="size").reset_index().assign(source=OURS)
    if compare_paper:
        stats = pd.concat([stats, _reported(frame, keys, spec.metrics)], ignore_index=True)
    return stats[[*keys, "source", "metric", "mean", "std", "n", "runs"]]


def _check_groups_differ_only_in_seed(frame: pd.DataFrame, keys: list[str]) -> None:
    """Refuses to average runs that differ in anything but their seed (or that repeat a seed)."""
    ignored = {*keys, *_SEED_LIKE}
    config = [
        c
        for c in frame.columns
        if c.startswith("config.") and c not in ignored and not c.startswith(_DESCRIPTIVE_PREFIXES)
    ]
    for group, runs in frame.groupby(keys, sort=False):
        if "seed" in runs.columns and runs["seed"].duplicated().any():
            repeated = runs[runs["seed"].duplicated(keep=False)].sort_values(["seed", "run"])
            seed = repeated["seed"].iloc[0]
            names = " and ".join(repeated.loc[repeated["seed"] == seed, "run"].astype(str))
            raise ValueError(
                f"the runs of {group} repeat seed {seed}: {names}; pass only one of them, add --one-per-seed to "
                "keep the first, or split them with --rows / --cols (e.g. a config.* key) if they differ"
            )
        differing = [c for c in config if runs[c].astype(str).nunique() > 1]
        if differing:
            raise ValueError(
                f"the runs of {group} differ in {', '.join(differing[:4])}; add the key(s) to --rows or --cols "
                "so that a cell only averages seeds"
            )


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
            row = {**dict(zip(keys, group, strict=True)), "metric": metric, "mean": float(value), "n": 0, "runs": 0}
            rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, "metric", "mean", "std", "n", "runs"]).assign(source=PAPER)


def render(stats: pd.DataFrame, spec: TableSpec, fmt: str = "markdown", decimals: int = 2) -> str:
    """The table of :func:`aggregate` as markdown, LaTeX (booktabs) or CSV (the long numeric frame)."""
    if fmt == "csv":
        return stats.to_csv(index=False)
    if fmt not in ("markdown", "latex"):
        raise ValueError(f"unknown table format {fmt!r}; use markdown, latex or csv")
    latex = fmt == "latex"
    stats = stats.copy()
    best = _best(stats, spec, decimals)
    plus_minus, bold = (r" $\pm$ ", r"\textbf{{{}}}") if latex else (" ± ", "**{}**")

    def cell(row: pd.Series) -> str:
        if pd.isna(row["mean"]):
            return "-"
        text = f"{row['mean']:.{decimals}f}"
        if row["n"] > 1 and not math.isnan(row["std"]):
            text += f"{plus_minus}{row['std']:.{decimals}f}"
        return bold.format(text) if row.name in best else text

    stats["cell"] = stats.apply(cell, axis=1)
    stats["metric"] = stats["metric"].map(lambda m: METRICS[m][1 if latex else 0])
    has_paper = bool((stats["source"] == PAPER).any())
    index = [*spec.rows, "source"] if has_paper else list(spec.rows)
    columns = [*spec.cols, "metric"]
    order = stats[columns].drop_duplicates()  # column groups (streams) in order of appearance, metrics as asked
    order = order.assign(
        _group=order.groupby(list(spec.cols), sort=False).ngroup() if spec.cols else 0,
        _metric=order["metric"].map({METRICS[m][1 if latex else 0]: i for i, m in enumerate(spec.metrics)}),
    ).sort_values(["_group", "_metric"])[columns]
    table = stats.pivot_table(index=index, columns=columns, values="cell", aggfunc="first", sort=False)
    if len(columns) == 1:
        table = table.reindex(columns=pd.Index(order["metric"], name="metric"))
        table.columns = pd.MultiIndex.from_arrays([table.columns])
    else:
        table = table.reindex(columns=pd.MultiIndex.from_frame(order))
    table = table.astype(object).where(table.notna(), "-")
    seeds = stats[stats["source"] == OURS].groupby(list(spec.rows), sort=False)["runs"].agg(["min", "max"])
    label = {key: str(r["min"]) if r["min"] == r["max"] else f"{r['min']}-{r['max']}" for key, r in seeds.iterrows()}
    rows = [dict(zip(index, key if isinstance(key, tuple) else (key,), strict=True)) for key in table.index]
    seed_column = ["" if row.get("source") == PAPER else label.get(_row_key(row, spec.rows), "") for row in rows]
    if not latex:
        flat = table.copy()
        flat.columns = [" ".join(str(part) for part in column) for column in table.columns]
        flat = flat.reset_index()
        flat["seeds"] = seed_column
        return flat.to_markdown(index=False, disable_numparse=True)
    table[("",) * (table.columns.nlevels - 1) + ("seeds",)] = seed_column
    styler = table.style.format_index(escape="latex", axis=0)
    styler = styler.format_index(lambda v: str(v) if "$" in str(v) else _escape(str(v)), axis=1)
    return styler.to_latex(hrules=True, multicol_align="c", column_format="l" * len(index) + "c" * table.shape[1])


def _escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#")):
        text = text.replace(char, escaped)
    return text


def _best(stats: pd.DataFrame, spec: TableSpec, decimals: int) -> set[int]:
    """Index labels of the best of our cells (as displayed, i.e. rounded) in every (cols..., metric) column."""
    ours = stats[(stats["source"] == OURS) & stats["mean"].notna()]
    best: set[int] = set()
    for (*_, metric), group in ours.groupby([*spec.cols, "metric"], sort=False):
        shown = group["mean"].round(decimals)
        target = shown.max() if METRICS[str(metric)][2] else shown.min()
        if len(group) > 1:
            best.update(group.index[shown == target])
    return best


def _row_key(row: dict[str, object], rows: Sequence[str]) -> object:
    values = tuple(row[key] for key in rows)
    return values if len(values) > 1 else values[0]
