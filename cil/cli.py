"""The ``cil`` command line: ``cil run`` (LightningCLI-based), ``cil summarize``, ``cil table`` and ``cil plot``.

``cil run --config configs/experiments/quickstart.yaml [--out DIR] [--resume] [--trainer.max_epochs 3] ...``
takes the trainer, backbone, method, stream and data settings from YAML and dotted overrides
(``--print_config`` shows the resolved config). The run seed is LightningCLI's ``--seed_everything``;
``--seeds 1993 1994 1995`` runs the experiment once per seed into ``OUT/seed_<seed>``, skipping finished seeds and
resuming interrupted ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cil.backbones import Backbone
from cil.data import DataConfig
from cil.engine import Engine, make_trainer_factory
from cil.method import CILMethod, list_methods, method_class, method_registry_name
from cil.results import accuracy_matrix, load_runs, load_summaries
from cil.stream import build_stream

__all__ = ["CILCLI", "main"]

log = logging.getLogger(__name__)

# glibc settings that keep freed tensor buffers in the heap instead of returning them to the kernel; measured on
# 2 CPU cores, EfficientNet-Lite0 at 224 px went from 26 to 75 img/s (page faults were 2/3 of the CPU time).
_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000", "MALLOC_TOP_PAD_": "1000000000"}
_USER_ERRORS = (FileNotFoundError, FileExistsError, KeyError, ValueError, argparse.ArgumentError)
_SPECIFIC_PARSER_ERRORS = ("not accepted", "does not accept", "unrecognized", "required", "No action", "Not a valid")


class CILCLI(LightningCLI):
    """LightningCLI with ``method`` / ``backbone`` / ``stream`` / ``data`` groups instead of model + datamodule.

    ``run=False``: parsing and instantiation only; :func:`main` drives the engine, building a fresh Trainer per task
    from the parsed ``trainer`` group.
    """

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items()})
        parser.add_class_arguments(Backbone, "backbone", instantiate=True)
        parser.add_subclass_arguments(CILMethod, "method", required=True)
        parser.link_arguments("backbone", "method.init_args.backbone", apply_on="instantiate")
        parser.add_argument("--stream", type=dict[str, Any], required=True, help="{name: <registered stream>, ...}")
        parser.add_class_arguments(DataConfig, "data")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--out", type=str, default="runs/latest", help="run directory")
        parser.add_argument("--resume", type=bool, default=False, help="continue the run in --out")
        parser.add_argument("--logger", type=str, default="csv", help="csv | tensorboard | none")
        parser.add_argument("--keep_checkpoints", type=int, default=0, help="keep the newest N checkpoints (0: all)")
        parser.add_argument(
            "--protocol",
            type=Literal["class_incremental", "task_incremental"],
            default="class_incremental",
            help="class_incremental: one label space, no task id at test time; task_incremental: NEVIS's protocol",
        )
        parser.add_argument("--count_flops", type=bool, default=True, help="count training FLOPs per task")
        parser.add_argument(
            "--max_steps_per_fit",
            type=int | None,
            default=None,
            help="cap every fit at N optimiser steps whatever the method asks (smoke tests, tiny runs)",
        )
        parser.add_argument(
            "--retention",
            type=dict[str, Any] | None,
            default=None,
            help="held-out stream for the retention probe ({name: <registered stream>, ...}), never trained",
        )
        parser.add_argument(
            "--reported",
            type=dict[str, Any] | None,
            default=None,
            help="the paper's numbers for this config ({source: ..., avg_incremental_acc: ...}), for cil table",
        )

    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate(self.config)
        self.model = self.config_init["method"]


def _resolved_config(cli: CILCLI) -> dict[str, Any]:
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_link_targets=False))


def _parse(args: list[str]) -> CILCLI:
    list_methods()  # import the built-in methods so that `class_path: methods.SimpleCIL` resolves
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads `args`; it warns when sys.argv has them too
    try:
        return CILCLI(
            run=False,
            args=args,
            seed_everything_default=1993,
            save_config_callback=None,
            auto_configure_optimizers=False,
            trainer_defaults={"max_epochs": 1, "enable_model_summary": False, "logger": False},
            parser_kwargs={
                "parser_mode": "omegaconf",
                "prog": "cil run",
                "exit_on_error": False,
                "allow_abbrev": False,
            },
        )
    finally:
        sys.argv = saved_argv


def run(args: list[str]) -> int:
    seeds, args = _pop_seeds(args)
    if not seeds:
        return _run_one(args)
    for seed in seeds:
        _run_one([*args, "--seed_everything", str(seed)], sweep_seed=seed)
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


def _run_one(args: list[str], sweep_seed: int | None = None) -> int:
    cli = _parse(args)
    config = _resolved_config(cli)
    seed = int(config["seed_everything"])
    out = Path(cli.config["out"])
    resume = bool(cli.config["resume"])
    if sweep_seed is not None:  # one directory per seed; resuming skips finished seeds (after checking their config)
        out = out / f"seed_{sweep_seed}"
        config["out"], resume = str(out), True
        if _complete(out):
            log.info("seed %d: %s is complete; checking that it was run with this config", sweep_seed, out)
    method = cli.config_init["method"]
    config["method_name"] = method_registry_name(method) or type(method).__name__.lower()
    stream = build_stream(config["stream"], seed=seed)
    trainer_kwargs = dict(cli.config_init["trainer"])
    trainer_kwargs.pop("logger", None)
    engine = Engine(
        method,
        stream,
        out,
        trainer_factory=make_trainer_factory(
            out, trainer_kwargs, logger=cli.config["logger"], max_steps_per_fit=cli.config["max_steps_per_fit"]
        ),
        data=cli.config_init["data"],
        seed=seed,
        config=config,
        resume=resume,
        keep_checkpoints=int(cli.config["keep_checkpoints"]),
        protocol=str(cli.config["protocol"]),
        count_flops=bool(cli.config["count_flops"]),
        retention=build_stream(config["retention"], seed=seed) if config.get("retention") else None,
    )
    summary = engine.run()
    print(f"\nAccuracy matrix R[i, j] (%), {stream.name}, {config['method_name']}:")
    print(_format_matrix(engine))
    print("\nSummary:")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}, indent=2))
    print(f"\nRun directory: {out}")
    return 0


def _complete(out: Path) -> bool:
    summary = out / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("complete") is True


def _format_matrix(engine: Engine) -> str:
    import pandas as pd

    names = [f"t{t.index}" for t in engine.stream]
    frame = pd.DataFrame(accuracy_matrix(pd.DataFrame(engine.results), len(names)), index=names, columns=names)
    return frame.to_string(float_format=lambda v: f"{v:6.2f}", na_rep="     -")


def summarize(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cil summarize", description="One row per run directory.")
    parser.add_argument("runs", nargs="+", help="run directories written by `cil run --out`")
    parser.add_argument("--format", choices=["text", "csv"], default="text")
    options = parser.parse_args(args)
    table = load_summaries(options.runs)
    columns = ["run", "method", "stream", "seed", "finished_tasks", "num_tasks", "avg_incremental_acc", "last_acc"]
    columns += ["avg_forgetting", "bwt", "wall_s", "trainable_params"]
    table = table[[c for c in columns if c in table.columns]]
    print(table.to_csv(index=False) if options.format == "csv" else table.to_string(index=False))
    load_runs(options.runs)  # validates that every results.csv is readable
    return 0


def table(args: list[str]) -> int:
    import pandas as pd

    from cil.tables import METRICS, TableSpec, aggregate, render

    parser = argparse.ArgumentParser(
        prog="cil table",
        description="Mean ± std over seeds of finished runs, best per column in bold, in a paper's layout.",
    )
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding them (e.g. a sweep's root)")
    parser.add_argument("--rows", nargs="+", default=["method"], help="summary or config.* keys (default: method)")
    parser.add_argument("--cols", nargs="*", default=["stream"], help="column groups (default: stream)")
    parser.add_argument(
        "--metrics", nargs="+", default=["avg_incremental_acc", "last_acc"], help=f"any of {', '.join(METRICS)}"
    )
    parser.add_argument("--format", choices=["markdown", "latex", "csv"], default="markdown")
    parser.add_argument("--decimals", type=int, default=2)
    parser.add_argument("--compare-paper", action="store_true", help="add the paper's numbers (configs' reported:)")
    parser.add_argument("--include-incomplete", action="store_true", help="also average runs that did not finish")
    options = parser.parse_args(args)
    summaries = load_summaries(options.runs, with_config=True)
    if not options.include_incomplete:
        finished = summaries["complete"].eq(True) if "complete" in summaries else pd.Series(False, summaries.index)
        for run_dir in summaries.loc[~finished, "run"]:
            print(f"cil table: skipping unfinished run {run_dir} (--include-incomplete keeps it)", file=sys.stderr)
        summaries = summaries[finished]
        if summaries.empty:
            raise ValueError("no finished run among the given directories (--include-incomplete to use them anyway)")
    spec = TableSpec(rows=options.rows, cols=options.cols, metrics=options.metrics)
    print(
        render(aggregate(summaries, spec, compare_paper=options.compare_paper), spec, options.format, options.decimals)
    )
    return 0


def plot(args: list[str]) -> int:
    from cil import plots

    kinds = {
        "overview": None,
        "seen": plots.seen_accuracy_curves,
        "forgetting": plots.forgetting_curves,
        "heatmap": plots.accuracy_heatmap,
        "old_new": plots.old_new_accuracy,
    }
    parser = argparse.ArgumentParser(prog="cil plot", description="Figures of one or more runs, saved to a file.")
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding them")
    parser.add_argument("--out", required=True, help="image file (.png, .pdf, .svg)")
    parser.add_argument("--kind", choices=list(kinds), default="overview")
    parser.add_argument("--label", default="method", help="what one line of the 'seen' curves stands for")
    parser.add_argument("--dpi", type=int, default=150)
    options = parser.parse_args(args)
    from matplotlib.figure import Figure

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
            kinds[options.kind](runs[runs["run"] == runs["run"].iloc[0]], ax=ax)  # type: ignore[misc]
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(options.out, dpi=options.dpi)
    print(options.out)
    return 0


def _reexec_with_tuned_malloc(argv: list[str]) -> None:
    """Re-runs this process once with the glibc malloc settings above (they are read at process start)."""
    if sys.platform != "linux" or os.environ.get("CIL_MALLOC_TUNED") or os.environ.get("CIL_NO_MALLOC_TUNING"):
        return
    env = {**os.environ, "CIL_MALLOC_TUNED": "1"}
    for key, value in _MALLOC_ENV.items():
        env.setdefault(key, value)
    os.execve(sys.executable, [sys.executable, "-m", "cil.cli", *argv], env)


def _one_line(error: BaseException) -> str:
    """The line of an error that says what to fix (jsonargparse reports nested config errors on many lines)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    original = text
    cause = re.search(r"Errors:\s*(.*?)\s*(?:Expected a|Given value|$)", text, flags=re.S)
    if cause and cause.group(1).strip(
        " -\n"
    ):  # union errors embed the whole namespace (a model's repr): keep the cause
        text = cause.group(1)
    lines = [line.strip(" -") for line in text.splitlines() if line.strip(" -")]
    if isinstance(error, argparse.ArgumentError):
        specific = [line for line in lines if any(marker in line for marker in _SPECIFIC_PARSER_ERRORS)]
        if not specific and 'key "method"' in original:
            classes = [method_class(name) for name in list_methods()]
            known = ", ".join(f"{cls.__module__}.{cls.__name__}" for cls in classes)
            return f"method.class_path must name a registered method class: {known}"
        return f"{(specific or lines or [text])[-1]} (`cil run --help` lists the options)"
    return " ".join(lines)


def _quiet_lightning() -> None:
    """Our own progress lines at INFO; Lightning's hardware banner and tips only when something is wrong."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # lightning 2.6 + torch 2.14, harmless
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")  # 0 workers is measured faster


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cil`` console script (``argv=None``) and of in-process calls (tests, notebooks)."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run, "summarize": summarize, "table": table, "plot": plot}
    if not argv or argv[0] not in commands:
        print(
            "usage: cil {run,summarize,table,plot} ...\n"
            "  cil run --config CONFIG.yaml [--out DIR] [--resume true] [--seeds 1993 1994 1995]\n"
            "  cil summarize RUN_DIR...\n"
            "  cil table RUN_DIR... [--rows method] [--cols stream] [--metrics ...] [--format markdown|latex|csv]\n"
            "  cil plot RUN_DIR... --out fig.png [--kind overview|seen|forgetting|heatmap|old_new]",
            file=sys.stderr,
        )
        return 2
    if from_command_line:
        _reexec_with_tuned_malloc(argv)
    _quiet_lightning()
    try:
        return commands[argv[0]](argv[1:])
    except _USER_ERRORS as error:
        if os.environ.get("CIL_DEBUG"):
            raise
        print(f"cil {argv[0]}: error: {_one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
