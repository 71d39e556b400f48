"""Side by side with the authors' code: an unmodified gqk/LAE checkout next to ``cil``'s LAE on identical inputs.

    python benchmarks/reference/lae_side_by_side.py --lae /tmp/lae --lae-python /tmp/laeenv/bin/python \
        --pet adapter --seed 1993 --out runs/reference/lae_adapter_seed1993

gqk/LAE (https://github.com/gqk/LAE, the code of the ICCV 2023 paper) pins timm 0.5.4, torchmetrics 0.10 and
lightning 1.9, which ``cil`` does not run on, so it runs in its own interpreter (``--lae-python``; how to make one
is in ``README.md`` here), started by this script on ``benchmarks/reference/_lae_reference.py``, which names
everything that is patched there (data and backbone entry points only). Nothing of LAE is copied into this
repository.

Both sides get, through ``DIR/exchange/inputs.pt``:

* the same images: every train and test image of the ``cil`` stream (Animal-MNIST, ``--increment`` classes per
  task, ``--train-per-class`` / ``--test-per-class``) as ``cil``'s evaluation transform makes it, without
  augmentation on either side (``data.augment: false`` here; continuum hands the tensors over as they are there),
  so that the only randomness left is each side's own (batch order, PET initialisation);
* the same class order (``cil``'s, as LAE's ``data.class_order``) and task sizes;
* the same ViT-B/16 (timm's, at ``--img-size`` px, initialised from ``--backbone-seed`` and saved once next to
  ``--out``: no pre-trained weights offline); their ``libml`` ViT loads the same state dict;
* the same hyper-parameters: LAE's ``config/vit_<pet>.yaml`` with ``--epochs``, ``--freeze-epochs``, ``--lr``,
  ``--batch-size`` and ``--ema-decay`` (default 0.9958: 25 steps per task here, see
  ``configs/experiments/lae_offline.yaml``) set on both sides.

Checks before training (the reference side refuses to train when one fails): every image LAE's data module hands
out is bit-identical to one ``cil`` sent, with the label its class order gives; their ViT's class-token features
equal ``cil``'s ``Backbone`` features to fp32 rounding on every test image. Then the PET modules: theirs, built and
attached by their ``MyModule``, every parameter moved by seeded noise, are copied into a fresh ``cil`` LAE (every
PET parameter of ours must be set), and both must give the same features on every test image (``checks.pet``); a
failure here is reported, and nothing of ours is trained.

Both sides then learn the stream; per step, the ensemble (the reported number), online and offline accuracy over
all seen test images are compared. Outputs under ``--out``: ``report.json``, ``table.md``, ``cil/`` (the run
directory), ``exchange/`` (the inputs, LAE's logs and ``reference.pt``) and ``reference.log``.

    python benchmarks/reference/lae_side_by_side.py table runs/reference/lae_adapter_seed*

prints the mean and standard deviation over seeds of both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pilot_side_by_side as shared

import cil
from cil.data import DataConfig, Transformed

REPO = Path(__file__).resolve().parents[2]
REFERENCE_SIDE = Path(__file__).resolve().parent / "_lae_reference.py"
PET_CLASSES = {"adapter": "Adapter", "lora": "LoRA", "prefix": "Prefix"}  # LAE's module.pet_cls


def _stream_tensors(stream: cil.Stream, transform: Any) -> dict[str, torch.Tensor]:
    """Every image of the stream through ``transform``, with its original label, train and test."""
    tensors: dict[str, list[torch.Tensor]] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for task in stream:
        for split, data in (("train", task.train), ("test", task.test)):
            source, indices = shared._underlying(data)
            transformed = Transformed(data, transform)
            for position, original in enumerate(indices):
                tensors[f"{split}_x"].append(transformed[position][0])
                tensors[f"{split}_y"].append(torch.tensor(int(source.targets[original])))
    return {key: torch.stack(values) for key, values in tensors.items()}


@torch.no_grad()
def _features(backbone: cil.Backbone, inputs: torch.Tensor, batch: int) -> torch.Tensor:
    with shared._eval_mode(backbone):
        return torch.cat([backbone(x) for x in inputs.split(batch)])


_THEIR_PET_NAMES = {  # gqk/LAE's PET parameter (within one block's module) -> cil's, under blocks.<b>.attn.
    "adapter": {
        "layer.0.weight": "adapter.down.weight",
        "layer.0.bias": "adapter.down.bias",
        "layer.2.weight": "adapter.up.weight",
        "layer.2.bias": "adapter.up.bias",
        "layer.3.scale": "adapter.scale",
    },
    "lora": {
        "lora_A.0": "qkv.lora_A.k",
        "lora_A.1": "qkv.lora_A.v",
        "lora_B.0": "qkv.lora_B.k",
        "lora_B.1": "qkv.lora_B.v",
        "scale.0.scale": "qkv.lora_scale.k",
        "scale.1.scale": "qkv.lora_scale.v",
    },
    "prefix": {
        "key.tokens": "prefix_key",
        "val.tokens": "prefix_value",
        "key.scaler.scale": "key_scale",
        "val.scaler.scale": "value_scale",
    },
}


@torch.no_grad()
def _check_pet(check: dict[str, Any], method: cil.CILMethod, pet: str, inputs: torch.Tensor) -> dict[str, Any]:
    """Their PET parameters (perturbed, see ``_lae_reference._perturbed_pet_check``) copied into a fresh ``cil`` LAE;
    both must give the same class-token features (fp32 rounding: < 1e-5 relative per row)."""
    ours = dict(method.backbone.model.named_parameters())
    copied, peft = 0, {name for name, p in ours.items() if p.requires_grad}
    for name, value in check["state"].items():
        index, _, local = name.partition(".")
        target = f"blocks.{check['blocks'][int(index)]}.attn.{_THEIR_PET_NAMES[pet][local]}"
        ours[target].copy_(value.reshape(ours[target].shape))
        peft.discard(target)
        copied += 1
    gap = shared.feature_gap(check["features"], _features(method.backbone, inputs, 64))
    return {
        "their_parameters": len(check["state"]),
        "copied": copied,
        "cil_pet_parameters_not_set": sorted(peft),
        "max_rel_diff": gap["max_rel_diff"],
        "passed": not peft and gap["max_rel_diff"] < 1e-5,
    }


def _cil_steps(run: Path) -> list[dict[str, float]]:
    results = pd.read_csv(run / "results.csv")
    tasks = pd.read_csv(run / "tasks.csv")
    steps = []
    for step, rows in results.groupby("train_task"):
        row = tasks[tasks["task"] == step].iloc[0] if "task" in tasks else tasks.iloc[int(step)]
        steps.append(
            {
                "ensemble": 100.0 * rows["n_correct"].sum() / rows["n_test"].sum(),
                "online": float(row["online_acc"]),
                "offline": float(row["offline_acc"]),
            }
        )
    return steps


def _reference_steps(reference: dict[str, Any]) -> list[dict[str, float]]:
    steps = []
    for step in reference["steps"]:
        labels = step["labels"]
        accuracy = {kind: 100.0 * float((step[kind] == labels).float().mean()) for kind in ("ensemble", "online")}
        offline = step["offline"] if len(step["offline"]) else step["online"]  # no offline module after task 0
        steps.append({**accuracy, "offline": 100.0 * float((offline == labels).float().mean())})
    return steps


def _summary(steps: list[dict[str, float]]) -> dict[str, Any]:
    ensemble = [s["ensemble"] for s in steps]
    return {
        "seen_accuracy": ensemble,
        "online_accuracy": [s["online"] for s in steps],
        "offline_accuracy": [s["offline"] for s in steps],
        "avg_incremental_acc": float(np.mean(ensemble)),
        "last_acc": ensemble[-1],
    }


def _markdown(report: dict[str, Any]) -> str:
    return "\n".join(shared.side_table(report, ("cil", "lae")))


def seed_table(runs: Sequence[Path]) -> str:
    """Mean and sample standard deviation over runs (seeds) of each side's A-bar, A_last and per-step accuracy."""
    reports = [json.loads((run / "report.json").read_text()) for run in runs]
    lines = [f"{len(reports)} runs: " + ", ".join(str(run) for run in runs)]
    for side in ("cil", "lae"):
        for key in ("avg_incremental_acc", "last_acc"):
            values = [r[side][key] for r in reports]
            lines.append(f"{side:4s} {key:20s} {np.mean(values):6.2f} +- {np.std(values, ddof=1):5.2f}  {values}")
        steps = np.array([r[side]["seen_accuracy"] for r in reports])
        lines.append(f"{side:4s} per step (mean)      " + " ".join(f"{v:6.2f}" for v in steps.mean(axis=0)))
    for key in ("avg_incremental_acc", "last_acc"):  # same seed = same class order on both sides: paired
        gaps = [r["cil"][key] - r["lae"][key] for r in reports]
        lines.append(f"cil - lae {key:15s} {np.mean(gaps):6.2f} +- {np.std(gaps, ddof=1):5.2f}  (paired by seed)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "table":  # lae_side_by_side.py table runs/reference/lae_adapter_seed*
        print(seed_table([Path(run) for run in argv[1:]]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lae", type=Path, required=True, help="an unmodified gqk/LAE checkout")
    parser.add_argument("--lae-python", type=Path, required=True, help="an interpreter with LAE's packages")
    parser.add_argument("--pet", choices=sorted(PET_CLASSES), default="adapter")
    parser.add_argument("--seed", type=int, default=1993, help="class order and initialisation, both sides")
    parser.add_argument("--increment", type=int, default=2, help="classes per task")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--freeze-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.0028125, help="Adam, both sides (LAE's CIFAR-100 value)")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--ema-decay", type=float, default=0.9958)
    parser.add_argument("--img-size", type=int, default=32, help="the seeded ViT-B/16's input size")
    parser.add_argument("--backbone-seed", type=int, default=0, help="seed of the ViT-B/16's random init")
    parser.add_argument(
        "--their-matmul-precision",
        choices=["highest", "high", "medium"],
        default="highest",
        help="TORCH_FLOAT32_MATMUL_PRECISION for LAE (its own default: medium, TF32 on GPUs)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/reference/lae_adapter"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="cil method init_args (YAML value)"
    )
    options = parser.parse_args(argv)
    out = options.out.resolve()
    for sub in ("cil", "exchange"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "exchange").mkdir(parents=True)

    # our side, built as `cil run` builds it
    config = shared._load_config(
        REPO / "configs/experiments/lae_offline.yaml", 0, options.increment, options.seed, "cpu"
    )
    config["stream"].update(train_per_class=options.train_per_class, test_per_class=options.test_per_class)
    config["method"]["init_args"].update(
        pet=options.pet,
        epochs=options.epochs,
        freeze_epochs=options.freeze_epochs,
        lr=options.lr,
        ema_decay=options.ema_decay,
    )
    for item in options.set:
        key, _, value = item.partition("=")
        config["method"]["init_args"][key] = yaml.safe_load(value)
    config["data"] = {**config["data"], "batch_size": options.batch_size, "augment": False, "num_workers": 0}
    weights = shared._seeded_vit_b16(
        out.parent / f"vit_b16_{options.img_size}px_seed{options.backbone_seed}.pth",
        options.backbone_seed,
        options.img_size,
    )
    config["backbone"] = {
        "name": shared.VIT_B16,
        "checkpoint_path": str(weights),
        "model_kwargs": {"img_size": options.img_size},
    }
    stream = cil.build_stream(config["stream"], seed=options.seed)
    backbone = cil.Backbone(**config["backbone"])
    plain = cil.Backbone(**config["backbone"])  # LAE injects its PET into `backbone`
    method = shared._build_method(config, backbone)
    config["method_name"] = type(method).__name__.lower()
    engine = cil.Engine(
        method,
        stream,
        out / "cil",
        trainer_factory=cil.make_trainer_factory(out / "cil", config["trainer"], logger="none"),
        data=DataConfig(**config["data"]),
        seed=options.seed,
        config=config,
    )
    order = [c for task in stream for c in task.metadata["original_classes"]]
    tensors = _stream_tensors(stream, engine.eval_transform)
    overrides = {
        "seed_everything": options.seed,
        "accelerator": "cpu",
        "data.num_init_classes": 0,
        "data.num_increment_classes": options.increment,
        "data.class_order": json.dumps(order),
        "data.dataloader.batch_size": options.batch_size,
        "data.dataloader.num_workers": 0,
        "data.dataloader.pin_memory": "false",
        "module.pet_cls": PET_CLASSES[options.pet],
        "module.num_epochs": options.epochs,
        "module.num_freeze_epochs": options.freeze_epochs,
        "module.optimizer.lr": options.lr,
        "module.ema_decay": options.ema_decay,
        "module.eval_every_n_epoch": options.epochs,  # its test pass after the last epoch only (no training effect)
    }
    torch.save(
        {
            **tensors,
            "class_order": torch.tensor(order),
            "check_x": tensors["test_x"],
            "check_features": _features(plain, tensors["test_x"], 64),
            "weights": str(weights),
            "img_size": options.img_size,
            "pet": options.pet,
            "overrides": overrides,
        },
        out / "exchange" / "inputs.pt",
    )
    report: dict[str, Any] = {
        "pet": options.pet,
        "lae_commit": shared._git_head(options.lae.resolve()),
        "lae_overrides": overrides,
        "cil_config": config,
        "stream": {"name": stream.name, "tasks": [list(t.classes) for t in stream], "order": order},
    }

    # their side, in its own interpreter
    started = time.perf_counter()
    with (out / "reference.log").open("w") as log:
        done = subprocess.run(
            [
                str(options.lae_python),
                str(REFERENCE_SIDE),
                "--lae",
                str(options.lae),
                "--exchange",
                str(out / "exchange"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
            env={**os.environ, "TORCH_FLOAT32_MATMUL_PRECISION": options.their_matmul_precision},
        )
    reference = (
        torch.load(out / "exchange" / "reference.pt", weights_only=True)
        if (out / "exchange" / "reference.pt").is_file()
        else {}
    )
    report["checks"] = reference.get("checks", {"passed": False, "reference_exit_status": done.returncode})
    report["checks"]["task_sizes_cil"] = [t.num_classes for t in stream]
    if "pet_check" in reference:
        fresh = shared._build_method(config, cil.Backbone(**config["backbone"]))
        report["checks"]["pet"] = _check_pet(reference["pet_check"], fresh, options.pet, tensors["test_x"])
        report["checks"]["passed"] &= report["checks"]["pet"]["passed"]
    if done.returncode != 0 or not report["checks"].get("passed"):
        shared._write(out, report)
        print(f"the reference side stopped (exit {done.returncode}): see {out / 'reference.log'}", file=sys.stderr)
        return 1
    report["lae"] = {
        **_summary(_reference_steps(reference)),
        "wall_s": reference["wall_s"],
        "cpu_s": reference["cpu_s"],
        "subprocess_wall_s": time.perf_counter() - started,
        "matmul_precision": reference["matmul_precision"],
    }

    started, cpu = time.perf_counter(), shared._cpu_seconds()
    engine.run()
    report["cil"] = {
        **_summary(_cil_steps(out / "cil")),
        "wall_s": time.perf_counter() - started,
        "cpu_s": shared._cpu_seconds() - cpu,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "table.md").write_text(_markdown(report) + "\n")
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
