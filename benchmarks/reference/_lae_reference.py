"""The authors' side of ``lae_side_by_side.py``: an unmodified gqk/LAE checkout, run in its own interpreter.

    <interpreter with LAE's pinned packages> benchmarks/reference/_lae_reference.py --lae /tmp/lae --exchange DIR

Started by ``lae_side_by_side.py``, which writes ``DIR/inputs.pt`` and reads ``DIR/reference.pt``; it imports
nothing of ``cil`` (LAE needs timm 0.5.4, torchmetrics 0.10, lightning 1.9, which ``cil`` does not run on). From
the checkout it runs ``main.py``'s ``MyDataModule`` / ``MyModule`` and ``libml``'s ``Trainer`` as ``App.main`` does,
with the config its ``config/vit_<pet>.yaml`` gives plus the command-line overrides ``main.py`` accepts. Patched,
for the duration of the run and nothing else:

* data: ``libml.core.datamodule.DataModule.configure_dataset`` returns a continuum ``InMemoryDataset`` of the
  ``cil`` stream's images as ``cil`` transforms them (``TaskType.TENSOR``: continuum hands the tensors over
  untouched, so ``MyDataModule``'s transforms never run), with their original labels; continuum's
  ``ClassIncremental`` orders the classes with ``data.class_order`` (``cil``'s order) as it always does;
* backbone: ``libml.model._BACKBONE["ViT-B_16"]`` builds their own ``libml.model.backbone.vit.VisionTransformer``
  (ViT-B/16 shapes) at the harness's image size and loads the seeded weights file instead of downloading;
* Python 3.11: while the checkout's modules are imported, ``dataclasses.dataclass`` turns a dataclass-instance
  default (``memory: MemoryConf = MemoryConf()``, which Python 3.11 refuses) into a ``default_factory`` that
  deep-copies it (Python <= 3.10 shares the instance; ``OmegaConf.structured`` copies it either way);
* torch >= 2: a 0-dim ``nn.Parameter`` formats as its value again (``Scaler.extra_repr`` writes
  ``f"{self.scale:.4f}"``, which torch 1.12 accepted and torch 2 refuses for ``Parameter``); printing only.

The matmul precision is the process's ``TORCH_FLOAT32_MATMUL_PRECISION`` (``libml/core/abc.py`` reads it, default
``medium``: TF32 on their GPUs, and on a CPU lower-precision matmuls that move features by ~1 %);
``lae_side_by_side.py`` sets ``highest`` unless told otherwise, as ``cil`` computes in fp32.

Observed only: ``MyModule.eval_epoch`` is wrapped to keep what it returns (online, offline and ensemble
predictions and the labels of every seen test image) after the last epoch of each task.

Before training it checks (and stops with exit status 3 if any fails) that every image continuum hands out is
bit-identical to the one ``cil`` sent with the same label, and that its ViT's class-token features on every image
equal ``cil``'s to fp32 rounding (relative difference per row < 1e-5: their attention is explicit matmuls and
softmax, timm 1.x's is ``scaled_dot_product_attention``). It also hands back its PET modules with perturbed
parameters and the features they give (:func:`_perturbed_pet_check`), for ``cil``'s side to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import inspect
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def _python311_dataclass_defaults() -> Iterator[None]:
    original = dataclasses.dataclass

    def dataclass(cls: Any = None, **kwargs: Any) -> Any:
        def wrap(c: Any) -> Any:
            for name in inspect.get_annotations(c):
                default = c.__dict__.get(name, dataclasses.MISSING)
                if dataclasses.is_dataclass(default) and not isinstance(default, type):
                    factory = lambda d=default: copy.deepcopy(d)  # noqa: E731
                    setattr(c, name, dataclasses.field(default_factory=factory))
            return original(c, **kwargs)

        return wrap if cls is None else wrap(cls)

    dataclasses.dataclass = dataclass  # type: ignore[assignment]
    try:
        yield
    finally:
        dataclasses.dataclass = original


@contextlib.contextmanager
def _parameter_formats_as_value() -> Iterator[None]:
    def format_(self: torch.Tensor, spec: str) -> str:
        return format(self.item(), spec) if self.dim() == 0 else object.__format__(self, spec)

    original = torch.nn.Parameter.__format__
    torch.nn.Parameter.__format__ = format_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Parameter.__format__ = original  # type: ignore[method-assign]


def _import_lae(root: Path) -> dict[str, Any]:
    if not (root / "main.py").is_file() or not (root / "libml" / "core" / "trainer.py").is_file():
        raise FileNotFoundError(f"{root} is not a gqk/LAE checkout (no main.py / libml/core/trainer.py)")
    sys.path.insert(0, str(root))
    names = ["main", "libml.core.datamodule", "libml.core.trainer", "libml.model", "libml.model.backbone.vit"]
    names += ["libml.utils.config"]
    with _python311_dataclass_defaults():
        return {name: importlib.import_module(name) for name in names}


@contextlib.contextmanager
def _patched(target: Any, name: str, value: Any) -> Iterator[None]:
    getter, setter = (target.__getitem__, target.__setitem__) if isinstance(target, dict) else (None, None)
    original = getter(name) if getter else getattr(target, name)
    (setter(name, value) if setter else setattr(target, name, value))
    try:
        yield
    finally:
        (setter(name, original) if setter else setattr(target, name, original))


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


@torch.no_grad()
def _perturbed_pet_check(
    lae: dict[str, Any], config: Any, vit: torch.nn.Module, inputs: torch.Tensor
) -> dict[str, Any]:
    """Their PET modules, made and attached by ``MyModule``'s own ``create_pets_vit`` / ``attach_pets_vit`` on a
    fresh seeded ViT, every parameter then moved by seeded noise (so adapters and LoRA are not the identity they
    start as); returns those parameters and the class-token features they give. ``lae_side_by_side.py`` loads the
    same values into ``cil``'s LAE and compares the features: the PET forward passes, checked on identical
    parameters."""
    host = argparse.Namespace(cfg=config.module, model=argparse.Namespace(backbone=vit))
    module_cls = lae["main"].MyModule
    pets = module_cls.create_pets_vit(host)
    module_cls.attach_pets_vit(host, pets)
    noise = torch.Generator().manual_seed(0)
    for parameter in pets.parameters():
        parameter.add_(0.05 * torch.randn(parameter.shape, generator=noise))
    return {
        "state": {name: value.clone() for name, value in pets.state_dict().items()},
        "features": _class_token_features(vit, inputs, 64),
        "blocks": list(config.module.adapt_blocks),
    }


@torch.no_grad()
def _class_token_features(backbone: torch.nn.Module, inputs: torch.Tensor, batch: int) -> torch.Tensor:
    backbone.eval()
    return torch.cat([backbone(x)[:, 0] for x in inputs.split(batch)])  # their head pools AvgToken(0, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lae", type=Path, required=True, help="an unmodified gqk/LAE checkout")
    parser.add_argument("--exchange", type=Path, required=True, help="where inputs.pt is and reference.pt goes")
    options = parser.parse_args()
    spec: dict[str, Any] = torch.load(options.exchange / "inputs.pt", weights_only=True)
    lae = _import_lae(options.lae.resolve())
    from absl import flags
    from continuum.datasets import InMemoryDataset
    from continuum.tasks import TaskType

    flags.FLAGS(["lae_reference"])  # App.run would parse them; their defaults (no --debug)
    splits = {True: (spec["train_x"], spec["train_y"]), False: (spec["test_x"], spec["test_y"])}

    def configure_dataset(self: Any, train: bool) -> Any:
        x, y = splits[train]
        return InMemoryDataset(x.numpy(), y.numpy(), data_type=TaskType.TENSOR, train=train)

    vit = lae["libml.model.backbone.vit"]
    weights = torch.load(spec["weights"], map_location="cpu", weights_only=True)

    def seeded_vit_b16(**kwargs: Any) -> torch.nn.Module:
        model = vit.VisionTransformer(
            img_size=int(spec["img_size"]), patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs
        )
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or any(not key.startswith("head.") for key in unexpected):
            raise ValueError(f"seeded weights do not fit LAE's ViT: missing {missing}, unexpected {unexpected}")
        return model

    argv = [f"{key}={value}" for key, value in spec["overrides"].items()]
    config, args = lae["libml.utils.config"].build_config(
        root=options.lae.resolve() / "config",
        name=f"vit_{spec['pet']}",
        argv=argv,
        structure=lae["main"].MyConf(),
        log_dir=options.exchange / "logs",
        version="none",
    )
    module_cls, datamodule_cls = lae["main"].MyModule, lae["main"].MyDataModule
    evaluations: list[dict[str, Any]] = []
    eval_epoch = module_cls.eval_epoch

    def recorded_eval_epoch(self: Any, loader: Any) -> Any:
        result = eval_epoch(self, loader)
        pred_on, pred_off, pred_ens, gts = (torch.cat(r) if r else torch.empty(0, dtype=torch.long) for r in result)
        evaluations.append(
            {"task": int(self.current_task), "epoch": int(self.current_epoch), "online": pred_on, "offline": pred_off}
            | {"ensemble": pred_ens, "labels": gts}
        )
        return result

    report: dict[str, Any] = {"config": str(config), "matmul_precision": None}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(lae["libml.core.datamodule"].DataModule, "configure_dataset", configure_dataset))
        stack.enter_context(_patched(lae["libml.model"]._BACKBONE, "ViT-B_16", seeded_vit_b16))
        stack.enter_context(_patched(module_cls, "eval_epoch", recorded_eval_epoch))
        stack.enter_context(_parameter_formats_as_value())
        datamodule = datamodule_cls(config.data)
        report["matmul_precision"] = torch.get_float32_matmul_precision()  # libml.core.abc sets it on import

        # checks, before anything is learned
        ours = {bytes(x.numpy().tobytes()): int(y) for x, y in zip(*splits[False], strict=True)}
        ours.update({bytes(x.numpy().tobytes()): int(y) for x, y in zip(*splits[True], strict=True)})
        order = [int(c) for c in spec["class_order"]]
        matched = total = 0
        for scenario in (datamodule.scenario_train, datamodule.scenario_val):
            for x, y, _ in scenario[:]:
                total += 1
                original = ours.get(bytes(x.numpy().tobytes()))
                matched += original is not None and order.index(original) == int(y)
        features = _class_token_features(seeded_vit_b16(), spec["check_x"], 64)
        gap = ((features - spec["check_features"]).norm(dim=1) / spec["check_features"].norm(dim=1)).max()
        report["checks"] = {
            "images_sent": len(spec["train_y"]) + len(spec["test_y"]),
            "images_handed_out": total,
            "bit_identical_with_label_in_order": matched,
            "class_token_max_rel_diff": float(gap),
            "task_sizes": list(map(int, datamodule.scenario_train.increments)),
        }
        passed = matched == total == report["checks"]["images_sent"] and float(gap) < 1e-5
        report["checks"]["passed"] = bool(passed)
        report["pet_check"] = _perturbed_pet_check(lae, config, seeded_vit_b16(), spec["check_x"])
        if not passed:
            torch.save(report, options.exchange / "reference.pt")
            print(f"checks failed: {report['checks']}", file=sys.stderr)
            return 3

        module = module_cls(config.module)
        trainer = lae["libml.core.trainer"].Trainer(config, args.log_dir)
        trainer.attach(module, datamodule)
        start, cpu = time.perf_counter(), _cpu_seconds()
        trainer.run(mode="train")
        report["wall_s"], report["cpu_s"] = time.perf_counter() - start, _cpu_seconds() - cpu
    last: dict[int, dict[str, Any]] = {}
    for evaluation in evaluations:  # after every epoch; the last one of each task counts
        last[evaluation["task"]] = evaluation
    report["steps"] = [last[t] for t in sorted(last)]
    torch.save(report, options.exchange / "reference.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
