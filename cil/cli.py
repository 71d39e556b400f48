"""The ``cil`` command line: ``cil run`` (LightningCLI-based), ``cil summarize``, ``cil table`` and ``cil plot``.

``cil run --config configs/experiments/quickstart.yaml [--out DIR] [--resume true] [--trainer.max_epochs 3] ...``
takes the trainer, backbone, method, stream and data settings from YAML and dotted overrides
(``--print_config`` shows the resolved config). The run seed is LightningCLI's ``--seed_everything``;
``--seeds 1993 1994 1995`` runs the experiment once per seed into ``OUT/seed_<seed>``, skipping finished seeds and
resuming interrupted ones. Methods are named as registered (``--method simplecil``) or by class path.

This module imports neither torch nor Lightning: the analysis commands and ``--help`` answer at once, and only
``cil run`` imports them (see :mod:`cil._run`). Before that, ``cil run`` checks that ``methods`` and ``streams`` are
the packages installed beside ``cil``: ``python -m cil.cli`` puts the current directory first on ``sys.path``, where a
``methods.py`` would otherwise be imported, and run, in their place.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shlex
import sys
import textwrap
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from cil._run import CILCLI

__all__ = ["CILCLI", "main"]

log = logging.getLogger(__name__)

_USER_ERRORS = (OSError, KeyError, ValueError, argparse.ArgumentError)  # OSError: FileNotFoundError, ...
_SPECIFIC_PARSER_ERRORS = ("not accepted", "does not accept", "unrecognized", "required", "No action", "Not a valid")

_USAGE = """\
usage: cil {run,summarize,table,plot} ...
  cil run --config CONFIG.yaml [--method NAME] [--out DIR] [--resume true] [--seeds 1993 1994 1995]
  cil summarize RUN_DIR...
  cil table RUN_DIR... [--rows method] [--cols stream] [--metrics ...] [--format markdown|latex|csv]
  cil plot RUN_DIR... --out fig.png [--kind overview|seen|forgetting|heatmap|old_new]

`cil COMMAND --help` describes a command."""

RUN_OPTIONS: tuple[tuple[str, str, Any, Any, str], ...] = (
    # (name, metavar, type, default, help): cil run's options besides the config groups and the seeds
    ("out", "DIR", str, "runs/latest", "run directory"),
    ("resume", "true|false", bool, False, "continue the run in --out after its last finished task"),
    ("logger", "csv|tensorboard|none", str, "csv", "Lightning logger of each task's fit, in OUT/logs"),
    ("keep_checkpoints", "N", int, 0, "keep the newest N task checkpoints (0: all)"),
    (
        "protocol",
        "class_incremental|task_incremental",
        Literal["class_incremental", "task_incremental"],
        "class_incremental",
        "class_incremental: one label space, no task id at test time; task_incremental: NEVIS's protocol",
    ),
    (
        "evaluate_future",
        "true|false",
        bool,
        False,
        "also score the tasks not trained yet, after every step and before the first (zero-shot): R's upper triangle, "
        "FWT and MTIL's Transfer; needs a method that scores classes by name (codyra on open_clip) or a "
        "domain-incremental stream",
    ),
    (
        "label_space",
        "seen|stream",
        Literal["seen", "stream"],
        "seen",
        "the classes a test image is scored among: the seen ones (or its task's, task_incremental), or every class of "
        "the stream, trained or not (X-TAIL; needs a method that scores classes by name)",
    ),
    ("count_flops", "true|false", bool, True, "count training FLOPs per task"),
    ("quiet", "true|false", bool, False, "no progress: neither the line per task nor Lightning's bars (batch jobs)"),
    (
        "feature_cache",
        "DIR",
        str | None,
        None,
        "reuse frozen embeddings across runs, seeds and methods: images already embedded in DIR with the same "
        "weights, transform and precision are read, not embedded again (one process only)",
    ),
    (
        "max_steps_per_fit",
        "N",
        int | None,
        None,
        "cap every fit at N optimiser steps whatever the method asks (smoke tests, tiny runs)",
    ),
    (
        "retention",
        "'{name: STREAM, ...}'",
        dict[str, Any] | None,
        None,
        "held-out stream for the retention probe, never trained",
    ),
    (
        "method_name",
        "NAME",
        str | None,
        None,
        "set by cil in a run's config.yaml (the method's registered name), so that file runs again as a config; "
        "must name the method given",
    ),
    (
        "reported",
        "'{source: ..., ...}'",
        dict[str, Any] | None,
        None,
        "the paper's numbers for this config (avg_incremental_acc: ...), for cil table --compare-paper",
    ),
)


def _run_help() -> str:
    """cil run's own options, printed before LightningCLI's full list (which takes a while to import)."""
    rows = [
        ("-c, --config CONFIG.yaml", "a config; repeat it to layer configs (later files and options win)"),
        (
            "--method NAME",
            "a registered method (listed below: simplecil, mos, lae_lora, ...) or a CILMethod class path; "
            "its arguments: --method.init_args.KEY VALUE",
        ),
        ("--stream '{name: NAME, ...}'", "a registered stream (listed below) and its options"),
        (
            "--seeds S [S ...]",
            "run once per seed into OUT/seed_<seed>, skipping finished seeds and resuming interrupted ones",
        ),
        ("--seed_everything SEED", "the run seed: class order and initialisation (default: 1993)"),
    ]
    rows += [
        (f"--{name} {metavar}", f"{text} (default: {json.dumps(default)})")
        for name, metavar, _, default, text in RUN_OPTIONS
    ]
    rows += [
        ("--print_config", "print the resolved config and exit"),
        ("--GROUP.KEY VALUE", "any key of the trainer, backbone, method, stream and data groups (full list below)"),
    ]
    lines = [
        "usage: cil run --config CONFIG.yaml [--config MORE.yaml ...] [--method NAME] [--out DIR] [--resume true]",
        "               [--seeds S ...] [--GROUP.KEY VALUE ...]",
        "",
        "cil run: trains and evaluates one method over a stream of tasks and writes the run directory",
        "(config.yaml, results.csv, summary.json, a checkpoint per finished task).",
        "",
        "cil options:",
    ]
    for flag, text in rows:
        wrapped = textwrap.wrap(text, width=120 - 34)
        first = f"  {flag:<32}" if len(flag) <= 30 else f"  {flag}\n{'':34}"
        lines.append(first + wrapped[0])
        lines += [f"{'':34}{line}" for line in wrapped[1:]]
    lines += [
        "",
        "SIGTERM (SLURM, timeout) and Ctrl-C stop a run with exit code 143 and 130; the same command with",
        "--resume true continues it after its last finished task, with the results of an uninterrupted run.",
    ]
    return "\n".join(lines)


def run(args: list[str]) -> int:
    """``cil run``: one run, or one per seed with ``--seeds``."""
    from cil._interrupt import interrupt_on_signals

    if "-h" in args or "--help" in args:
        print(_run_help(), flush=True)  # at once: LightningCLI's full list below needs torch and Lightning
    with interrupt_on_signals():
        from cil import _run

        seeds, args = _pop_seeds(args)
        if not seeds:
            return _run.run_one(args)
        for seed in seeds:
            _run.run_one([*args, "--seed_everything", str(seed)], sweep_seed=seed)
        return 0


def _pop_seeds(args: list[str]) -> tuple[list[int], list[str]]:
    """Takes ``--seeds S1 S2 ...`` (or ``--seeds=S1,S2``) out of the arguments."""
    rest: list[str] = []
    seeds: list[str] = []
    given = False
    position = 0
    while position < len(args):
        arg = args[position]
        if arg == "--seeds":
            given, position = True, position + 1
            while position < len(args) and not args[position].startswith("-"):  # up to the next option
                seeds.extend(args[position].split(","))
                position += 1
            continue
        if arg.startswith("--seeds="):
            given = True
            seeds.extend(arg.split("=", 1)[1].split(","))
        else:
            rest.append(arg)
        position += 1
    try:
        parsed = [int(seed) for seed in seeds if seed]
    except ValueError:
        raise ValueError(f"seeds must be integers (--seeds 1993 1994), got {' '.join(seeds)!r}") from None
    if given and not parsed:
        raise ValueError("no seed after --seeds; give at least one, e.g. --seeds 1993 1994 1995")
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"a seed appears twice in --seeds: {parsed}")
    return parsed, rest


def summarize(args: list[str]) -> int:
    from cil.results import load_runs, load_summaries

    parser = argparse.ArgumentParser(prog="cil summarize", description="One row per run directory.")
    parser.add_argument("runs", nargs="+", help="run directories written by `cil run --out`")
    parser.add_argument("--format", choices=["text", "csv"], default="text")
    options = parser.parse_args(args)
    load_runs(options.runs)  # every results.csv readable, before a line of the table is printed
    table = load_summaries(options.runs)
    columns = ["run", "method", "stream", "seed", "finished_tasks", "num_tasks", "avg_incremental_acc", "last_acc"]
    columns += ["avg_forgetting", "bwt", "wall_s", "trainable_params"]
    table = table[[c for c in columns if c in table.columns]]
    print(table.to_csv(index=False) if options.format == "csv" else table.to_string(index=False))
    return 0


def table(args: list[str]) -> int:
    import pandas as pd

    from cil.results import PER_TASK_METRICS, load_summaries
    from cil.tables import METRICS, TableSpec, aggregate, render

    parser = argparse.ArgumentParser(
        prog="cil table",
        description="Mean ± std over seeds of finished runs, best per column in bold, in a paper's layout.",
    )
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding them (e.g. a sweep's root)")
    parser.add_argument("--rows", nargs="+", default=["method"], help="summary or config.* keys (default: method)")
    parser.add_argument("--cols", nargs="*", default=None, help="column groups (default: stream; task with --per-task)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help=f"any of {', '.join(METRICS)} (default: avg_incremental_acc last_acc; final_accuracy with --per-task)",
    )
    parser.add_argument("--format", choices=["markdown", "latex", "csv"], default="markdown")
    parser.add_argument("--decimals", type=int, default=2)
    parser.add_argument("--compare-paper", action="store_true", help="add the paper's numbers (configs' reported:)")
    parser.add_argument("--include-incomplete", action="store_true", help="also average runs that did not finish")
    parser.add_argument(
        "--per-task",
        action="store_true",
        help="a column group per task and one for their average (MTIL's layout; per-domain tables): metrics "
        "final_accuracy, forgetting, mtil_transfer, mtil_average, mtil_last",
    )
    options = parser.parse_args(args)
    metrics = options.metrics or (["final_accuracy"] if options.per_task else ["avg_incremental_acc", "last_acc"])
    if options.per_task and set(metrics) - set(PER_TASK_METRICS):
        raise ValueError(
            f"--per-task tables hold per-task metrics ({', '.join(PER_TASK_METRICS)}); "
            f"{', '.join(sorted(set(metrics) - set(PER_TASK_METRICS)))} has one value per run: drop --per-task for it"
        )
    summaries = load_summaries(options.runs, with_config=True, per_task=options.per_task)
    cols = options.cols if options.cols is not None else ([] if options.per_task else ["stream"])
    if options.per_task and "task" not in [*options.rows, *cols]:
        cols = [*cols, "task"]
    if not options.include_incomplete:
        finished = summaries["complete"].eq(True) if "complete" in summaries else pd.Series(False, summaries.index)
        for run_dir in summaries.loc[~finished, "run"]:
            print(f"cil table: skipping unfinished run {run_dir} (--include-incomplete keeps it)", file=sys.stderr)
        summaries = summaries[finished]
        if summaries.empty:
            raise ValueError("no finished run among the given directories (--include-incomplete to use them anyway)")
    spec = TableSpec(rows=options.rows, cols=cols, metrics=metrics)
    print(
        render(aggregate(summaries, spec, compare_paper=options.compare_paper), spec, options.format, options.decimals)
    )
    return 0


def plot(args: list[str]) -> int:
    kinds = ["overview", "seen", "forgetting", "heatmap", "old_new"]
    parser = argparse.ArgumentParser(prog="cil plot", description="Figures of one or more runs, saved to a file.")
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding them")
    parser.add_argument("--out", required=True, help="image file (.png, .pdf, .svg)")
    parser.add_argument("--kind", choices=kinds, default="overview")
    parser.add_argument("--label", default="method", help="what one line of the 'seen' curves stands for")
    parser.add_argument("--dpi", type=int, default=150)
    options = parser.parse_args(args)
    from matplotlib.figure import Figure

    from cil import plots
    from cil.results import load_runs

    runs = load_runs(options.runs)
    if options.label not in runs.columns:
        raise ValueError(f"--label must be a results column: {', '.join(runs.columns)}")
    if options.kind not in ("overview", "seen") and runs["run"].nunique() > 1:
        print(f"cil plot: --kind {options.kind} draws one run: {runs['run'].iloc[0]}", file=sys.stderr)
    if options.kind == "overview":
        figure = plots.overview(runs, label=options.label)
    else:
        figure = Figure(figsize=(6.5, 4.5), layout="constrained")
        ax = figure.subplots()
        if options.kind == "seen":
            plots.seen_accuracy_curves(runs, label=options.label, ax=ax)
        else:
            draw = {
                "forgetting": plots.forgetting_curves,
                "heatmap": plots.accuracy_heatmap,
                "old_new": plots.old_new_accuracy,
            }[options.kind]
            draw(runs[runs["run"] == runs["run"].iloc[0]], ax=ax)
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(options.out, dpi=options.dpi)
    print(options.out)
    return 0


def _one_line(error: BaseException) -> str:
    """The line of an error that says what to fix (jsonargparse reports nested config errors on many lines)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    original = text
    worker = _worker_error(text)
    if worker is not None:
        return worker
    cause = re.search(r"Errors:\s*(.*?)\s*(?:Expected a|Given value|$)", text, flags=re.S)
    if cause and cause.group(1).strip(
        " -\n"
    ):  # union errors embed the whole namespace (a model's repr): keep the cause
        text = cause.group(1)
        key = re.search(r'^Parser key "([^"]+)"', original)
        if key and key.group(1) not in text:  # `trainer.logger: Import path torch.nn.Linear does not correspond ...`
            cause_lines = [_BULLET.sub("", line).strip() for line in text.splitlines()]
            text = f"{key.group(1)}: {' '.join(line for line in cause_lines if line)}"  # one cause, on one line
    elif isinstance(error, argparse.ArgumentError):
        union = _union_error(text)
        if union is not None:
            return f"{union} (`cil run --help` lists the options)"
    lines = [_BULLET.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if isinstance(error, argparse.ArgumentError):
        specific = [line for line in lines if any(marker in line for marker in _SPECIFIC_PARSER_ERRORS)]
        if not specific and 'key "method"' in original:
            from cil.method import list_methods

            return f"method.class_path must name a method: {', '.join(list_methods())}, or a CILMethod class path"
        return f"{(specific or lines or [text])[-1]} (`cil run --help` lists the options)"
    return " ".join(lines)


_BULLET = re.compile(r"^\s*-(\s|$)")  # jsonargparse's list bullets; a value's own minus sign (`-5 is not`) stays


def _union_error(text: str) -> str | None:
    """``KEY: VALUE is not accepted; expected one of A, B or null`` for a value that matches none of the types of a
    union (jsonargparse lists each type's failure without saying which values are valid)."""
    key = re.search(r'Parser key "([^"]+)"', text)
    given = re.search(r"^\s*Given value: (.*)$", text, flags=re.M)
    subtypes = re.search(r"^\s*Subtypes: \[(.*)\]\s*$", text, flags=re.M)
    if not (key and given and subtypes):
        return None
    choices: list[str] = []
    for literal in re.findall(r"Literal\[([^\]]*)\]", subtypes.group(1)):
        choices += [value.strip().strip("'\"") for value in literal.split(",")]
    others = re.sub(r"(?:typing\.)?Literal\[[^\]]*\],?\s*", "", subtypes.group(1))
    others = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", others).replace("typing.", "")
    kinds = ["null" if kind == "NoneType" else kind for kind in (k.strip() for k in others.split(", ")) if kind]
    expected = ([f"one of {', '.join(dict.fromkeys(choices))}"] if choices else []) + kinds
    return f"{key.group(1)}: {given.group(1)!r} is not accepted; expected {' or '.join(expected)}"


def _worker_error(text: str) -> str | None:
    """The error a DataLoader worker raised, without the traceback that PyTorch puts into the message."""
    if "Original Traceback (most recent call last):" not in text:
        return None
    lines = text.rsplit("Traceback (most recent call last):", 1)[1].splitlines()
    exception = [i for i, line in enumerate(lines) if line and not line[0].isspace()]  # frames are indented
    if not exception:
        return None
    message = " ".join(line.strip() for line in lines[exception[0] :] if line.strip())
    message = re.sub(r"^[A-Za-z_][\w.]*(?::\s+|$)", "", message, count=1)  # `ValueError: `
    process = re.search(r"in (DataLoader worker process \d+)", text)
    return f"{message} (in {process.group(1)})" if process else message


def _resume_command(args: list[str]) -> str:
    """The command line that continues an interrupted ``cil run ARGS``."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join(["cil", "run", *kept, "--resume", "true"])


def _quiet_lightning() -> None:
    """Our own progress lines at INFO; Lightning's hardware banner and tips only when something is wrong."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # lightning 2.6 + torch 2.14, harmless
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")  # 0 workers is measured faster


def _shadowing_package() -> str | None:
    """Why ``methods`` or ``streams`` would not be the packages beside ``cil``, found without importing them.

    ``cil run`` imports both by name; ``python -m cil.cli`` puts the current directory first on ``sys.path``, so a
    ``methods.py`` or a ``streams/`` folder there would be imported (and its code run) in their place.
    """
    home = Path(__file__).resolve().parent.parent  # the folder holding the cil package
    for name in ("methods", "streams"):
        expected = home / name / "__init__.py"
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return f"cannot find cil's {name!r} package (expected {str(expected)!r}); reinstall cil (pip install -e .)"
        locations = list(spec.submodule_search_locations or [])
        found = spec.origin if spec.origin not in (None, "namespace") else (locations[0] if locations else "?")
        if spec.origin is None or Path(spec.origin).resolve() != expected.resolve():
            return (
                f"{str(found)!r} shadows cil's {name!r} package ({str(expected.parent)!r}): it is earlier on sys.path "
                "(the current directory comes first with `python -m`) and would be imported instead; rename it, or "
                "run cil from another directory"
            )
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cil`` console script (``argv=None``) and of in-process calls (tests, notebooks)."""
    from cil._interrupt import Interrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run, "summarize": summarize, "table": table, "plot": plot}
    if argv and argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0
    if not argv or argv[0] not in commands:
        print(_USAGE, file=sys.stderr)
        return 2
    if argv[0] == "run":
        shadowing = _shadowing_package()
        if shadowing is not None:
            print(f"cil run: error: {shadowing}", file=sys.stderr)
            return 1
    _quiet_lightning()
    try:
        return commands[argv[0]](argv[1:])
    except Interrupted as stop:
        print(f"cil run: {stop}; resume with: {_resume_command(argv[1:])}", file=sys.stderr)
        return stop.exit_code
    except _USER_ERRORS as error:
        if os.environ.get("CIL_DEBUG"):
            raise
        print(f"cil {argv[0]}: error: {_one_line(error)}", file=sys.stderr)
        return 1


def __getattr__(name: str) -> Any:
    if name == "CILCLI":  # the LightningCLI subclass lives with the heavy imports
        from cil._run import CILCLI

        return CILCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
