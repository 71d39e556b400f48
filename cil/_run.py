"""``cil run``: the LightningCLI parser, registered method names, and one run of the engine.

Kept apart from :mod:`cil.cli` because it imports torch, Lightning and timm, which the other commands do not need.

Method names: ``--method simplecil``, ``--method.class_path mos``, ``method: mos`` and
``method: {class_path: lae_lora, init_args: ...}`` in YAML all name registered methods. The names are turned into
class paths (``methods.SimpleCIL``, the form the configs use, so a run's config and its resume hash do not depend
on how the method was named) before jsonargparse sees them: on the command line here, in documents by the
parser's loader (``parser_mode="cil"``: OmegaConf's loader plus this rewrite).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import io
import json
import logging
import re
import sys
import textwrap
import typing
import zipfile
from pathlib import Path
from typing import Any

import jsonargparse
import numpy as np
import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cil._distributed import is_rank_zero
from cil.backbones import Backbone
from cil.cli import RUN_OPTIONS
from cil.data import DataConfig
from cil.engine import MAX_SEED, Engine, make_trainer_factory
from cil.method import CILMethod, list_methods, method_class, method_registry_name
from cil.results import accuracy_matrix, baseline_accuracy
from cil.stream import _STREAMS, build_stream, list_streams

__all__ = ["CILCLI", "method_class_path", "resolve_method", "run_one"]

log = logging.getLogger(__name__)

_PARSER_MODE = "cil"
_PLAIN_NAME = re.compile(r"^[A-Za-z_][\w.]*$")  # a registered name or a class path; anything else is jsonargparse's


class CILCLI(LightningCLI):
    """LightningCLI with ``method`` / ``backbone`` / ``stream`` / ``data`` groups instead of model + datamodule.

    ``run=False``: parsing and instantiation only; :func:`run_one` drives the engine, building a fresh Trainer per
    task from the parsed ``trainer`` group.
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
        for name, _, kind, default, text in RUN_OPTIONS:
            parser.add_argument(f"--{name}", type=kind, default=default, help=text)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        seed = self.config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed_everything must be between 0 and {MAX_SEED} (numpy's seed range), got {seed}")

    def instantiate_classes(self) -> None:
        _check_backbone_checkpoint(self.config["backbone"].get("checkpoint_path"))
        self.config_init = self.parser.instantiate(self.config)
        self.model = self.config_init["method"]


def _check_backbone_checkpoint(path: str | None) -> None:
    """Refuses a ``backbone.checkpoint_path`` that torch cannot read (a text file, a truncated download) in one line,
    before the backbone is built. Reads tensors lazily (safetensors' header, a memory-mapped ``torch.save`` file)."""
    if not path or not Path(path).is_file():
        return  # none, or a missing file that the backbone reports
    try:
        if Path(path).suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt"):
                pass
        else:
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ValueError(
            f"backbone.checkpoint_path {path!r} is not a checkpoint torch can read ({type(error).__name__}: "
            f"{reason}); point it at a state dict saved with torch.save, or a .safetensors file"
        ) from error


# ---- method names ------------------------------------------------------------------------------------------------
def method_class_path(cls: type) -> str:
    """The import path that names ``cls`` in configs: ``methods.SimpleCIL`` where the class's top-level package
    exports it, ``module.Class`` otherwise."""
    package = cls.__module__.split(".")[0]
    if getattr(sys.modules.get(package), cls.__name__, None) is cls:
        return f"{package}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_method(value: str) -> str:
    """The class path for a registered method name; class names and importable class paths unchanged.

    Raises:
        ValueError: ``value`` names no method; the message suggests the closest registered name.
    """
    names = list_methods()
    if value in names:
        return method_class_path(method_class(value))
    if "." not in value:
        if value in {cls.__name__ for cls in _subclasses(CILMethod)}:  # jsonargparse resolves class names itself
            return value
    elif _importable(value):
        return value
    raise ValueError(_unknown_method(value, names))


def _subclasses(cls: type) -> set[type]:
    direct: set[type] = set(cls.__subclasses__())
    return direct.union(*(_subclasses(sub) for sub in direct))


def _importable(path: str) -> bool:
    module, _, name = path.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except (ImportError, ValueError):
        return False


def _unknown_method(value: str, names: list[str]) -> str:
    by_key = {name: name for name in names}
    for name in names:  # class names too, lower-cased: `SimpleCl` -> simplecil
        by_key.setdefault(method_class(name).__name__.lower(), name)
    close = difflib.get_close_matches(value.rsplit(".", 1)[-1].lower(), by_key, n=1)
    if close:
        return f"unknown method {value!r}; did you mean {by_key[close[0]]!r}?"
    return f"unknown method {value!r}; the registered methods are {', '.join(names)}"


def _resolve_method_args(args: list[str]) -> list[str]:
    """``--method NAME`` / ``--method.class_path NAME`` (also with ``=``) with registered names as class paths, and
    the ``method`` of every ``--config`` file checked, so that a wrong name is reported before anything runs."""
    resolved = list(args)
    for position, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if option in ("--config", "-c"):
            path = value if equals else (args[position + 1] if position + 1 < len(args) else "")
            _check_config_method(path)
        if option not in ("--method", "--method.class_path"):
            continue
        if not equals and position + 1 < len(args):
            value = args[position + 1]
        if not _PLAIN_NAME.match(value) or _is_file(value):
            continue  # a YAML dict (the loader resolves it), a config file, or something for jsonargparse to reject
        if equals:
            resolved[position] = f"{option}={resolve_method(value)}"
        else:
            resolved[position + 1] = resolve_method(value)
    return resolved


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except OSError:  # a YAML string too long for a file name
        return False


def _check_config_method(path: str) -> None:
    if not _is_file(path):
        return  # jsonargparse reports a missing file, and reads a YAML string given instead of a path
    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return  # jsonargparse reports it
    if config is not None and not isinstance(config, dict):
        raise ValueError(
            f"config file {path!r} holds a YAML {type(config).__name__}, not a mapping of keys; write it as "
            "`trainer: {...}`, `method: ...`, `stream: {...}` (configs/experiments/quickstart.yaml is an example)"
        )
    method = config.get("method") if isinstance(config, dict) else None
    value = method.get("class_path") if isinstance(method, dict) else method
    if isinstance(value, str) and _PLAIN_NAME.match(value):
        try:
            resolve_method(value)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def _with_class_paths(document: Any) -> Any:
    """A loaded YAML document with registered method names as class paths: its ``method`` (a name, or a dict with
    a ``class_path``), and its own ``class_path`` (the value of ``--method '{class_path: mos, ...}'``)."""
    if not isinstance(document, dict):
        return document
    names = list_methods()
    method = document.get("method")
    if isinstance(method, str) and method in names:
        document["method"] = resolve_method(method)
    elif isinstance(method, dict) and method.get("class_path") in names:
        method["class_path"] = resolve_method(method["class_path"])
    if document.get("class_path") in names:
        document["class_path"] = resolve_method(document["class_path"])
    return document


def _load(value: str) -> Any:
    """jsonargparse's ``omegaconf`` parser mode (YAML with ``${...}`` interpolation), then :func:`_with_class_paths`."""
    from omegaconf import OmegaConf

    plain = jsonargparse.get_loader("yaml")(value)
    if plain is None or isinstance(plain, (str, int, float, bool)):
        return plain
    interpolated = OmegaConf.to_object(OmegaConf.load(io.StringIO(value)))
    document = plain if interpolated == {value: None} else interpolated
    return _with_class_paths(document)


# ---- parsing and running -----------------------------------------------------------------------------------------
def _parse(args: list[str]) -> CILCLI:
    list_methods()  # import the built-in methods so that `class_path: methods.SimpleCIL` resolves
    args = _resolve_method_args(args)
    jsonargparse.set_loader(_PARSER_MODE, _load, (yaml.YAMLError,))
    if "-h" in args or "--help" in args:
        print()
        for kind, names in (("methods", list_methods()), ("streams", list_streams())):
            print(
                textwrap.fill(
                    ", ".join(names), width=120, initial_indent=f"registered {kind}: ", subsequent_indent="  "
                )
            )
        print("\nEvery option, by group (YAML keys have the same names: `trainer: {max_epochs: 3}`):\n", flush=True)
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
                "parser_mode": _PARSER_MODE,
                "prog": "cil run",
                "usage": "%(prog)s --config CONFIG.yaml [--GROUP.KEY VALUE ...]",
                "description": "cil run: all options (cil's own are described above)",
                "exit_on_error": False,
                "allow_abbrev": False,
            },
        )
    finally:
        sys.argv = saved_argv


def _resolved_config(cli: CILCLI) -> dict[str, Any]:
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_link_targets=False))


def run_one(args: list[str], sweep_seed: int | None = None) -> int:
    """Parses ``args``, runs the engine over the stream, prints the accuracy matrix and the summary."""
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
    name = method_registry_name(method) or type(method).__name__.lower()
    if config.get("method_name") not in (None, name):  # a run's config.yaml with another --method on top
        raise ValueError(
            f"method_name {config['method_name']!r} (from a run's config.yaml) names another method than the one "
            f"given ({name!r}); drop method_name, or give --method_name {name}"
        )
    config["method_name"] = name
    _check_stream_options(config["stream"], "stream")
    if config.get("retention"):
        _check_stream_options(config["retention"], "retention")
    stream = build_stream(config["stream"], seed=seed)
    trainer_kwargs = dict(cli.config_init["trainer"])
    trackers = _trackers(trainer_kwargs.pop("logger", None))
    if cli.config["quiet"]:  # batch jobs: warnings and the final summary only
        trainer_kwargs["enable_progress_bar"] = False
        logging.getLogger("cil").setLevel(logging.WARNING)
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
        evaluate_future=bool(cli.config["evaluate_future"]),
        label_space=str(cli.config["label_space"]),
        count_flops=bool(cli.config["count_flops"]),
        feature_cache=cli.config["feature_cache"],
        retention=build_stream(config["retention"], seed=seed) if config.get("retention") else None,
        trackers=trackers,
    )
    summary = engine.run()
    if not is_rank_zero():  # several processes: one report
        return 0
    print(f"\nAccuracy matrix R[i, j] (%), {stream.name}, {config['method_name']}:")
    print(_format_matrix(engine))
    print("\nSummary:")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}, indent=2))
    print(f"\nRun directory: {out}")
    return 0


def _trackers(value: Any) -> list[Any]:
    """``trainer.logger`` of the config as a list: Lightning loggers (``class_path`` + ``init_args``) that follow the
    whole run (:class:`cil.tracking.RunTracker` checks them). Per-task logs in OUT/logs are ``--logger``'s."""
    if value in (None, False):
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _check_stream_options(spec: Any, key: str) -> None:
    """Each option of a stream spec against the type its factory declares (``increment: int``), so that ``increment:
    two`` is one line naming ``stream.increment`` instead of a ``TypeError`` from inside the factory. Unknown names
    and missing options are left to :func:`cil.stream.build_stream`, which lists the valid ones."""
    if not isinstance(spec, dict):
        raise ValueError(f"{key} must be a mapping such as {{name: sklearn_digits, increment: 2}}, got {spec!r}")
    if "name" not in spec:
        return
    factory = _STREAMS.get(str(spec["name"]))
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # annotations that do not resolve: the factory checks its own arguments
        return
    for option, value in spec.items():
        hint = hints.get(option)
        if option == "name" or hint is None:
            continue
        parser = jsonargparse.ArgumentParser(exit_on_error=False)
        try:
            parser.add_argument(f"--{option}", type=hint)
        except Exception:  # a type jsonargparse cannot check
            continue
        try:
            parser.parse_object({option: value})
        except argparse.ArgumentError:
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise ValueError(
                f"{key}.{option} must be {_type_name(hint)} (stream {spec['name']!r}), got {shown}"
            ) from None


def _type_name(hint: Any) -> str:
    """``int``, ``list[int] | None``: a type as it is written in code."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "").replace("NoneType", "None")


def _complete(out: Path) -> bool:
    summary = out / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("complete") is True


def _format_matrix(engine: Engine) -> str:
    import pandas as pd

    names = [f"t{t.index}" for t in engine.stream]
    results = pd.DataFrame(engine.results)
    frame = pd.DataFrame(accuracy_matrix(results, len(names)), index=names, columns=names)
    baseline = baseline_accuracy(results, len(names))
    if not np.isnan(baseline).all():  # evaluate_future: every task before the first, zero-shot
        frame = pd.concat([pd.DataFrame([baseline], index=["zero-shot"], columns=names), frame])
    return frame.to_string(float_format=lambda v: f"{v:6.2f}", na_rep="     -")
