"""Side by side with the authors' code: an unmodified LAMDA-PILOT checkout next to ``cil`` on identical inputs.

    python benchmarks/reference/pilot_side_by_side.py --pilot /tmp/pilot --method simplecil \
        --out runs/reference/simplecil
    python benchmarks/reference/pilot_side_by_side.py --pilot /tmp/pilot --method mos --train-per-class 20 \
        --test-per-class 10 --epochs 2 --seed 1993 --out runs/reference/mos_seed1993
    python benchmarks/reference/pilot_side_by_side.py --pilot /tmp/pilot --method aper_adapter --train-per-class 20 \
        --test-per-class 10 --epochs 2 --batch-size 48 --seed 1993 --out runs/reference/aper_adapter_seed1993

PILOT (https://github.com/LAMDA-CL/LAMDA-PILOT) is imported from ``--pilot`` at run time; nothing of it is copied
into this repository. Two of its functions are replaced, from here, for the duration of the run:

* ``utils.data_manager._get_idata``: returns an ``iData`` whose images are the uint8 arrays of the ``cil`` stream
  (same train / test split, same per-class caps) with ``cil``'s own evaluation / training transforms as PILOT's
  ``test_trsf`` / ``train_trsf`` (``common_trsf`` empty). PILOT shuffles the class order itself
  (``shuffle: true``, ``np.random.seed(seed)``); the harness checks that it equals ``cil``'s.
* ``utils.inc_net.get_backbone`` (SimpleCIL): returns a deep copy of the timm model inside ``cil``'s ``Backbone``
  (same weights), with the ``out_dim`` attribute PILOT reads.
* MOS instead: PILOT's own ``get_backbone`` runs unchanged (it builds the AdaptFormer tuning config from ``args``)
  and builds its own ``backbone/vit_mos.py`` ViT. Its factory ``vit_mos.vit_base_patch16_224_mos`` is wrapped to
  add ``img_size`` (``--img-size``, default 32 px) and to see, as ``timm``, a shim whose ``create_model`` builds
  timm's ``vit_base_patch16_224`` at that size and loads a ViT-B/16 initialised from ``--backbone-seed`` (saved once
  next to ``--out``) instead of downloading ImageNet weights; the factory's own q/k/v split and ``mlp.fc`` rename
  load them. ``cil`` gets the same file as ``Backbone(name="vit_base_patch16_224", checkpoint_path=...,
  model_kwargs={"img_size": 32})``. ``data.eval_batch_size`` is set to 3 x ``batch_size`` (PILOT's
  ``_compute_mean`` batch, which sets how many merge pulls the statistics pass makes).
* APER (adapter) likewise: ``vit_adapter.vit_base_patch16_224_adapter`` is wrapped the same way (the
  ``backbone_type: pretrained_vit_b16_224_adapter`` of ``exps/aper_aperpter.json`` is kept), and ``utils.inc_net``
  sees the same ``timm`` shim, so the plain PTM branch that its dual-branch network asks ``get_backbone`` for
  (``pretrained_vit_b16_224`` -> ``timm.create_model``) is the seeded ViT-B/16 too. ``cil`` gets it as for MOS;
  ``data.eval_batch_size`` = ``batch_size`` (PILOT's APER test and prototype loaders).
* APER with SSF, VPT (deep, shallow) or fine-tuning: see ``_pilot_vit_patches`` (PILOT's ``vit_ssf`` weight loading,
  which does not run on timm 1.x, is replaced by its constructor plus the seeded weights; ``build_promptmodel`` gets
  the shim and a 32-px ``VPT_ViT``). Every value of the authors' ``exps/aper_*.json`` goes to ``cil``'s side too
  (``_aper_hyperparameters``); before training, PILOT's initial PEFT values are copied into a copy of ``cil``'s tuned
  branch and both must compute the same features (``_check_tuned_branch``).

Two further wrappers only observe: ``utils.factory.get_model`` hands the Learner it builds to the harness, whose
``_eval_cnn`` is wrapped to keep its predictions (same return value); on our side ``cil.engine.TaskAccuracy`` is
replaced by a subclass that keeps the predictions it scores. PILOT runs through its own ``trainer._train`` with the
hyper-parameters of its ``exps/<method>.json``; only ``dataset``, ``init_cls``, ``increment``, ``shuffle``,
``seed``, ``device`` and ``backbone_type`` (not for MOS / APER) are set by the harness, and ``tuned_epoch`` /
``batch_size`` when ``--epochs`` / ``--batch-size`` are given (the same values go to ``cil``).
``timm.models.layers.weight_init`` (moved in timm 1.x) is aliased to ``timm.layers.weight_init`` when the old path
does not import.

Before anything is learned the harness checks, and stops if any fails:

1. class order: PILOT's ``DataManager._class_order`` equals the order of ``cil``'s stream;
2. inputs: every train and test image's tensor from PILOT's ``DummyDataset`` (``mode="test"``) equals ``cil``'s
   (``Transformed(task.train / task.test, engine.eval_transform)``), bit for bit (``torch.equal``);
3. backbone: the state dicts are equal and PILOT's ``SimpleVitNet.extract_vector`` gives bit-identical features to
   ``cil``'s ``Backbone`` on every one of those tensors. MOS: ``cil``'s state dict, converted to vit_mos's keys, equals
   vit_mos's (adapters and head aside); vit_mos with ``adapter_id=-1`` (no adapter; APER: vit_adapter with its adapters
   at init, which add exact zeros) vs ``cil``'s ViT before adapter injection agree to fp32 rounding (relative difference
   < 1e-5 per row: their attention is three projections, ``bmm`` and softmax, timm's one fused projection and
   ``scaled_dot_product_attention``, so bit identity is not expected), and ``cil``'s ViT after injection (adapters at
   init) is bit-identical to before. APER also: PILOT's plain PTM branch (timm's model) has ``cil``'s state dict and
   bit-identical features.

Then both sides learn the stream; the prediction on every test image after every task is compared. Outputs under
``--out``: ``report.json`` (checks, per-step accuracies, A-bar / A_last, wall times, disagreements),
``predictions.csv`` (one row per step and test image), ``table.md``, ``cil/`` (the ``cil`` run directory) and
``pilot/`` (PILOT's ``logs/`` tree).

PILOT needs packages that ``cil`` does not: ``pip install scipy tqdm`` (and ``pip install easydict`` for MOS and
APER).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import pandas as pd
import timm
import torch
import yaml
from torch import nn

import cil
import cil.engine
from cil.data import ArrayDataset, DataConfig, Transformed
from cil.metrics import TaskAccuracy
from cil.task import LabelMapped

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class MethodSpec:
    """How one method is run on each side."""

    pilot_json: str  # under the PILOT checkout's exps/
    cil_config: str  # under this repository's configs/
    pilot_backbone: str = ""  # how PILOT builds its own ViT (a key of PILOT_BACKBONES); both sides then get a seeded
    # ViT-B/16 instead of pre-trained weights. Empty: PILOT is handed a copy of cil's backbone (SimpleCIL)

    @property
    def seeded_vit(self) -> bool:
        return bool(self.pilot_backbone)

    @property
    def aper(self) -> bool:
        return self.pilot_json.startswith("aper_")


METHODS = {
    "simplecil": MethodSpec("simplecil.json", "configs/experiments/simplecil_vit_offline.yaml"),
    "mos": MethodSpec("mos.json", "configs/experiments/mos_offline.yaml", "vit_mos.vit_base_patch16_224_mos"),
    "aper_adapter": MethodSpec(
        "aper_aperpter.json",  # sic: the authors' file name for APER with adapter
        "configs/experiments/aper_adapter_offline.yaml",
        "vit_adapter.vit_base_patch16_224_adapter",
    ),
    "aper_ssf": MethodSpec("aper_ssf.json", "configs/experiments/aper_ssf_offline.yaml", "vit_ssf"),
    "aper_vpt_deep": MethodSpec("aper_vpt_deep.json", "configs/experiments/aper_vpt_deep_offline.yaml", "vpt"),
    "aper_vpt_shallow": MethodSpec("aper_vpt_shallow.json", "configs/experiments/aper_vpt_shallow_offline.yaml", "vpt"),
    "aper_finetune": MethodSpec("aper_finetune.json", "configs/experiments/aper_finetune_offline.yaml", "timm"),
}
VIT_B16 = "vit_base_patch16_224"  # the timm model PILOT's vit_mos / vit_adapter factories load their weights from


# ---- our side ------------------------------------------------------------------------------------------------
class _RecordingAccuracy(TaskAccuracy):
    """``TaskAccuracy`` that also keeps what it is given; one instance per evaluation (= per training task)."""

    calls: ClassVar[list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = []

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        _RecordingAccuracy.calls.append(self.seen)

    def update(self, preds: torch.Tensor, target: torch.Tensor, task_ids: torch.Tensor) -> None:
        labels = preds.argmax(dim=1) if preds.ndim == 2 else preds
        self.seen.append((labels.clone().cpu(), target.clone().cpu(), task_ids.clone().cpu()))
        super().update(preds, target, task_ids)


@contextlib.contextmanager
def _recording_engine() -> Iterator[list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]]:
    original = cil.engine.TaskAccuracy
    _RecordingAccuracy.calls = []
    cil.engine.TaskAccuracy = _RecordingAccuracy  # type: ignore[misc]
    try:
        yield _RecordingAccuracy.calls
    finally:
        cil.engine.TaskAccuracy = original  # type: ignore[misc]


def _load_config(path: Path, base: int, increment: int, seed: int, device: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    config["seed_everything"] = seed
    config["stream"] = {**config["stream"], "base": base, "increment": increment}
    config["trainer"] = {
        **config.get("trainer", {}),
        "accelerator": device,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return config


def _build_method(config: dict[str, Any], backbone: cil.Backbone) -> cil.CILMethod:
    cil.list_methods()  # imports methods/ so that class paths resolve
    module_name, _, class_name = str(config["method"]["class_path"]).rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(backbone=backbone, **(config["method"].get("init_args") or {}))


def _underlying(dataset: Any) -> tuple[ArrayDataset, list[int]]:
    if not isinstance(dataset, LabelMapped) or not isinstance(dataset.dataset, ArrayDataset):
        raise ValueError("the harness needs an in-memory stream (animal_mnist, sklearn_digits)")
    return dataset.dataset, dataset.indices


def _aper_hyperparameters(pilot_json: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``cil``'s APER ``init_args`` and ``data`` for the values of one of PILOT's ``exps/aper_*.json``. What PILOT
    fixes in code rather than in the json is ``cil``'s default already: SGD momentum 0.9, AdaptFormer scale 0.1 and
    dropout 0.1, VPT prompts at zero, SSF init std 0.02."""
    if pilot_json["optimizer"] != "sgd" or float(pilot_json["min_lr"]) != 0:
        raise ValueError(
            f"APER in cil anneals SGD to 0; this json asks {pilot_json['optimizer']} to {pilot_json['min_lr']}"
        )
    init_args: dict[str, Any] = {
        "epochs": int(pilot_json["tuned_epoch"]),
        "lr": float(pilot_json["init_lr"]),
        "weight_decay": float(pilot_json["weight_decay"]),
        "momentum": 0.9,
    }
    model = pilot_json["model_name"]
    if model == "aper_adapter":
        init_args["peft_options"] = {"bottleneck": int(pilot_json["ffn_num"])}
    elif model == "aper_vpt":
        init_args["peft_options"] = {"num_tokens": int(pilot_json["prompt_token_num"])}
    return init_args, {"batch_size": int(pilot_json["batch_size"])}


# ---- PILOT ---------------------------------------------------------------------------------------------------
def _import_pilot(root: Path) -> dict[str, Any]:
    """PILOT's modules, imported from its checkout (its modules import each other from its root)."""
    if not (root / "trainer.py").is_file() or not (root / "utils" / "data_manager.py").is_file():
        raise FileNotFoundError(f"{root} is not a LAMDA-PILOT checkout (no trainer.py / utils/data_manager.py)")
    sys.path.insert(0, str(root))
    for name in ("weight_init", "helpers"):  # timm >= 1.0 moved them; PILOT's linears.py / vit_ssf.py use the old paths
        try:
            importlib.import_module(f"timm.models.layers.{name}")
        except ModuleNotFoundError:
            sys.modules[f"timm.models.layers.{name}"] = importlib.import_module(f"timm.layers.{name}")
    names = ["utils.data", "utils.data_manager", "utils.inc_net", "utils.factory", "trainer"]
    return {name: importlib.import_module(name) for name in names}


def _pilot_args(
    root: Path, spec: MethodSpec, base: int, increment: int, seed: int, device: str, backbone_type: str
) -> dict[str, Any]:
    args: dict[str, Any] = json.loads((root / "exps" / spec.pilot_json).read_text())
    args.update(
        dataset="cil_stream",
        init_cls=base or increment,
        increment=increment,
        shuffle=True,
        seed=seed,  # trainer._train takes one seed; trainer.train loops over a list
        device=[-1] if device == "cpu" else [0],
        config=f"exps/{spec.pilot_json}",  # what main.py would add
    )
    if not spec.seeded_vit:  # MOS / APER keep their json's: their get_backbone branches on the name
        args["backbone_type"] = backbone_type  # names the log file; the patched get_backbone ignores it
    return args


def _make_idata(
    pilot: dict[str, Any], train: ArrayDataset, test: ArrayDataset, train_trsf: Any, test_trsf: Any
) -> Callable[..., Any]:
    base = pilot["utils.data"].iData

    class CilStream(base):  # type: ignore[misc, valid-type]
        """The ``cil`` stream's images and transforms in PILOT's dataset interface."""

        use_path = False

        def __init__(self) -> None:
            self.train_trsf = [train_trsf]
            self.test_trsf = [test_trsf]
            self.common_trsf: list[Any] = []
            self.class_order = None  # PILOT shuffles with its seed; the harness checks the result

        def download_data(self) -> None:
            self.train_data, self.train_targets = train.images, train.targets.copy()
            self.test_data, self.test_targets = test.images, test.targets.copy()

    def get_idata(dataset_name: str, args: Any = None) -> Any:
        if dataset_name != "cil_stream":
            raise ValueError(f"the harness only provides dataset 'cil_stream', PILOT asked for {dataset_name!r}")
        return CilStream()

    return get_idata


def _make_get_backbone(backbone: cil.Backbone) -> Callable[..., nn.Module]:
    def get_backbone(args: Any, pretrained: bool = False) -> nn.Module:
        model = copy.deepcopy(backbone.model)
        model.out_dim = backbone.num_features  # type: ignore[assignment]
        return model.eval()

    return get_backbone


def _seeded_vit_b16(path: Path, seed: int, img_size: int) -> Path:
    """A ViT-B/16 (timm ``vit_base_patch16_224`` at ``img_size`` px) initialised from ``seed``, saved once: the
    stand-in for the pre-trained weights PILOT's ``vit_mos`` / ``vit_adapter`` factories and its plain
    ``get_backbone("pretrained_vit_b16_224")`` would download (no network here)."""
    if not path.is_file():
        torch.manual_seed(seed)
        model = timm.create_model(VIT_B16, pretrained=False, num_classes=0, img_size=img_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return path


class _TimmWithLocalWeights:
    """What ``backbone/vit_mos.py`` / ``vit_adapter.py`` (and, for APER, ``utils/inc_net.py``) see as ``timm``
    while PILOT builds a backbone: ``create_model(VIT_B16, pretrained=True, num_classes=n)`` builds the timm model at
    the harness's image size (its head initialised by timm, as the real call's new head is) and loads the seeded
    weights instead of downloading; everything else is timm."""

    def __init__(self, state: dict[str, torch.Tensor], img_size: int) -> None:
        self.state, self.img_size = state, img_size

    def __getattr__(self, name: str) -> Any:
        return getattr(timm, name)

    def create_model(self, name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if name == f"{VIT_B16}_ssf":  # registered by PILOT's vit_ssf, whose weight loading the harness replaces
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        if name != VIT_B16:
            raise ValueError(f"the harness provides weights for {VIT_B16!r} only, PILOT asked for {name!r}")
        model = timm.create_model(name, pretrained=False, img_size=self.img_size, **kwargs)
        missing, unexpected = model.load_state_dict(self.state, strict=False)
        if unexpected or any(not key.startswith("head.") for key in missing):
            raise ValueError(f"seeded weights do not fit {name}: missing {missing}, unexpected {unexpected}")
        return model


def _load_seeded(model: nn.Module, state: dict[str, torch.Tensor], own: tuple[str, ...]) -> nn.Module:
    """Load the seeded PTM weights into one of PILOT's ViTs; only its own parameters (``own`` prefixes / infixes,
    e.g. SSF's) and the head may stay as that ViT initialised them."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    stray = [key for key in missing if not key.startswith("head.") and not any(part in key for part in own)]
    if unexpected or stray:
        raise ValueError(f"seeded weights do not fit {type(model).__name__}: missing {stray}, unexpected {unexpected}")
    return model


def _pilot_vit_patches(
    pilot_backbone: str, inc_net: Any, state: dict[str, torch.Tensor], img_size: int
) -> list[contextlib.AbstractContextManager[None]]:
    """PILOT's own ``get_backbone`` runs unchanged (it builds the tuning config from ``args``); what it calls to
    build a ViT is redirected to the seeded weights at the harness's image size, at the narrowest point:

    * ``<module>.<factory>`` (``vit_mos.vit_base_patch16_224_mos``, ``vit_adapter.vit_base_patch16_224_adapter``):
      the factory is wrapped to add ``img_size`` and to see :class:`_TimmWithLocalWeights` as ``timm``, so its own
      q/k/v split and ``mlp.`` rename load the weights;
    * ``vit_ssf``: ``timm.create_model("vit_base_patch16_224_ssf")`` runs PILOT's factory, whose
      ``_create_vision_transformer`` does not run on timm 1.x (it indexes the ``PretrainedCfg`` dataclass); it is
      replaced by what it does minus the download: ``vit_ssf.VisionTransformer(img_size=..., **kwargs)`` (SSF
      parameters initialised by PILOT's ``init_ssf_scale_shift``), then the seeded weights (same key names);
    * ``vpt``: ``backbone.vpt.build_promptmodel`` runs unchanged; it sees the shim as ``timm`` and a ``VPT_ViT``
      built at ``img_size`` (it constructs one at 224 px);
    * ``timm``: nothing beyond the shim (APER with fine-tuning: PILOT tunes timm's own ViT).

    ``utils.inc_net`` always sees the shim as ``timm``: APER's dual-branch network asks
    ``get_backbone("pretrained_vit_b16_224")`` for the plain PTM, which is ``timm.create_model("vit_base_patch16_224",
    pretrained=True, num_classes=0)`` there."""
    shim = _TimmWithLocalWeights(state, img_size)
    patches: list[contextlib.AbstractContextManager[None]] = [_patched(inc_net, "timm", shim)]
    if pilot_backbone == "vit_ssf":
        module = importlib.import_module("backbone.vit_ssf")

        def create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
            if variant != VIT_B16:
                raise ValueError(f"the harness provides weights for {VIT_B16!r} only, PILOT asked for {variant!r}")
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm 1.x registry arguments
                kwargs.pop(key, None)
            return _load_seeded(module.VisionTransformer(img_size=img_size, **kwargs), state, ("ssf_",))

        return [*patches, _patched(module, "_create_vision_transformer", create)]
    if pilot_backbone == "vpt":
        module = importlib.import_module("backbone.vpt")
        vpt_vit = module.VPT_ViT

        def vpt_at_size(*args: Any, **kwargs: Any) -> nn.Module:
            kwargs.setdefault("img_size", img_size)
            return vpt_vit(*args, **kwargs)

        return [*patches, _patched(module, "timm", shim), _patched(module, "VPT_ViT", vpt_at_size)]
    if pilot_backbone == "timm":
        return patches
    module_name, _, factory_name = pilot_backbone.partition(".")
    module = importlib.import_module(f"backbone.{module_name}")
    factory = getattr(module, factory_name)

    def wrapped(*args: Any, **kwargs: Any) -> nn.Module:
        kwargs.setdefault("img_size", img_size)
        with _patched(module, "timm", shim):
            return factory(*args, **kwargs)

    return [*patches, _patched(module, factory_name, wrapped)]


def _timm_to_vit_mos_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vit_mos's (and vit_adapter's) key conversion, reproduced for the check: ``qkv`` split into ``q_proj`` /
    ``k_proj`` / ``v_proj`` (rows ``[:D]``, ``[D:2D]``, ``[2D:]``), ``mlp.fc1`` / ``mlp.fc2`` -> ``fc1`` / ``fc2``."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".qkv." in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3), strict=True):
                converted[key.replace("qkv", name)] = part
        else:
            converted[key.replace("mlp.fc", "fc")] = value
    return converted


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its reaped children (PILOT's DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _pilot_indices(targets: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Original indices of the images PILOT's ``get_dataset(classes)`` returns, in its order (class by class)."""
    return np.concatenate([np.flatnonzero(targets == c) for c in classes])


# ---- checks --------------------------------------------------------------------------------------------------
def _check_inputs(
    dm: Any, stream: cil.Stream, eval_transform: Any, train: ArrayDataset, test: ArrayDataset
) -> dict[str, Any]:
    """Every image's tensor on both sides; returns counts, and the stacked tensors for the backbone check."""
    ours: dict[tuple[str, int], torch.Tensor] = {}
    for task in stream:
        for source, data in (("train", task.train), ("test", task.test)):
            _, indices = _underlying(data)
            transformed = Transformed(data, eval_transform)
            for position, i in enumerate(indices):
                ours[(source, i)] = transformed[position][0]
    theirs: dict[tuple[str, int], torch.Tensor] = {}
    labels_equal = True
    for source, targets in (("train", dm._train_targets), ("test", dm._test_targets)):
        classes = list(range(dm.nb_classes))
        dataset = dm.get_dataset(np.arange(dm.nb_classes), source=source, mode="test")
        originals = _pilot_indices(targets, classes)
        reference = train if source == "train" else test
        for position, original in enumerate(originals):
            _, image, label = dataset[position]
            theirs[(source, int(original))] = image
            expected = dm._class_order.index(int(reference.targets[original]))
            labels_equal &= int(label) == expected
    keys = sorted(ours)
    equal = [torch.equal(ours[k], theirs[k]) for k in keys if k in theirs]
    return {
        "images_cil": len(ours),
        "images_pilot": len(theirs),
        "same_images": sorted(ours) == sorted(theirs),
        "bit_identical": int(sum(equal)),
        "max_abs_diff": max(float((ours[k] - theirs[k]).abs().max()) for k in keys if k in theirs),
        "pilot_labels_follow_order": bool(labels_equal),
        "shape": list(next(iter(ours.values())).shape),
        "tensors": torch.stack([ours[k] for k in keys]),
    }


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Evaluation mode for the checks, then every submodule's own mode back: Lightning keeps the modes it finds, so a
    check that left ``cil``'s modules in eval mode would train them without dropout (the adapters' 0.1)."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _same_state(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    """The same tensor names, each bit-identical."""
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def feature_gap(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, Any]:
    """How far two ``[N, D]`` feature matrices of the same images are apart: rows equal bit for bit, the largest
    absolute difference and the largest per-row relative difference (``|a - b| / |a|``)."""
    return {
        "bit_identical_rows": int((ours == theirs).all(dim=1).sum()),
        "max_abs_diff": float((ours - theirs).abs().max()),
        "max_rel_diff": float(((ours - theirs).norm(dim=1) / ours.norm(dim=1)).max()),
    }


@torch.no_grad()
def _check_backbone(backbone: cil.Backbone, pilot_net: Any, inputs: torch.Tensor, batch: int) -> dict[str, Any]:
    ours_state, theirs_state = backbone.model.state_dict(), pilot_net.backbone.state_dict()
    same_state = _same_state(ours_state, theirs_state)
    with _eval_mode(backbone, pilot_net.backbone):
        ours = torch.cat([backbone(x) for x in inputs.split(batch)])
        theirs = torch.cat([pilot_net.extract_vector(x) for x in inputs.split(batch)])
    return {
        "state_dict_equal": bool(same_state),
        "images": len(inputs),
        "feature_dim": int(ours.shape[1]),
        "bit_identical_rows": int((ours == theirs).all(dim=1).sum()),
        "max_abs_diff": float((ours - theirs).abs().max()),
    }


@torch.no_grad()
def _check_vit_mos_backbone(
    plain: cil.Backbone,
    injected: cil.Backbone,
    pilot_vit: nn.Module,
    inputs: torch.Tensor,
    batch: int,
    pilot_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """PTM weights and features: ``cil``'s ViT before adapter injection and after it (adapters at their init, ``up``
    zero) vs PILOT's forked ViT: ``vit_mos.VisionTransformer`` with ``adapter_id=-1`` (no adapter) or, through
    ``pilot_features``, ``vit_adapter.VisionTransformer`` with its adapters at init (``up_proj`` zero: they add
    exact zeros)."""
    ours_state = _timm_to_vit_mos_keys(plain.model.state_dict())
    theirs_state = {k: v for k, v in pilot_vit.state_dict().items() if "adapt" not in k and not k.startswith("head.")}
    same_state = _same_state(ours_state, theirs_state)
    if pilot_features is None:
        pilot_features = lambda x: pilot_vit(x, adapter_id=-1)["features"]  # noqa: E731
    with _eval_mode(plain, injected, pilot_vit):
        ours = torch.cat([plain(x) for x in inputs.split(batch)])
        ours_injected = torch.cat([injected(x) for x in inputs.split(batch)])
        theirs = torch.cat([pilot_features(x) for x in inputs.split(batch)])
    return {
        "state_dict_equal": bool(same_state),
        "tensors_compared": len(ours_state),
        "images": len(inputs),
        "feature_dim": int(ours.shape[1]),
        **feature_gap(ours, theirs),
        "injected_vs_plain_bit_identical_rows": int((ours_injected == ours).all(dim=1).sum()),
        "injected_vs_plain_max_abs_diff": float((ours_injected - ours).abs().max()),
    }


def _ssf_key(theirs: str) -> str:
    """Where a parameter of PILOT's ``vit_ssf`` ViT lives in ``cil``'s SSF injection (``cil/layers/_ssf.py``):
    ``ssf_{scale,shift}_1`` / ``_2`` follow the first / second operation of the module that owns them."""
    owner, _, name = theirs.rpartition(".") if "." in theirs else ("", "", theirs)
    kind, index = name.removeprefix("ssf_").split("_")  # "scale", "1"
    first = index == "1"
    if owner == "patch_embed":
        target = "patch_embed.proj" if first else "patch_embed.norm"
    elif owner == "":
        target = "norm"  # after the final norm
    elif owner.endswith(".attn"):
        target = f"{owner}.{'qkv' if first else 'proj'}"
    elif owner.endswith(".mlp"):
        target = f"{owner}.{'fc1' if first else 'fc2'}"
    else:  # a block
        target = f"{owner}.{'norm1' if first else 'norm2'}"
    return f"model.{target}.{kind}"


@torch.no_grad()
def _transplant(adapted: cil.Backbone, pilot_vit: nn.Module) -> tuple[cil.Backbone, dict[str, int]]:
    """A copy of ``cil``'s tuned branch holding PILOT's initial PEFT values (SSF's random scales and shifts; VPT's
    prompts, zero on both sides), so that the two tuned ViTs can be compared as functions before training."""
    ours = copy.deepcopy(adapted)
    own = dict(ours.named_parameters())
    theirs = {k: v for k, v in pilot_vit.named_parameters() if "ssf_" in k or k == "Prompt_Tokens"}
    copied = 0
    for key, value in theirs.items():
        if key == "Prompt_Tokens":  # [depth or 1, T, D] -> blocks.i.prompts [T, D]
            for i, prompts in enumerate(value):
                own[f"model.blocks.{i}.prompts"].copy_(prompts)
                copied += 1
        else:
            own[_ssf_key(key)].copy_(value)
            copied += 1
    ours_peft = sum(1 for k, p in own.items() if p.requires_grad)
    theirs_count = sum(len(v) if k == "Prompt_Tokens" else 1 for k, v in theirs.items())
    return ours, {"theirs": theirs_count, "ours": ours_peft, "copied": copied}


@torch.no_grad()
def _check_tuned_branch(
    plain: cil.Backbone,
    adapted: cil.Backbone,
    pilot_vit: nn.Module,
    pilot_features: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    batch: int,
) -> dict[str, Any]:
    """APER's tuned branch before training (SSF, VPT, fine-tuning): PTM weights equal, and, with PILOT's initial PEFT
    values transplanted into a copy of ours, the same features up to fp32 rounding (SSF's fork computes attention
    with its own matmuls; VPT's and fine-tuning's ViTs are timm's)."""
    ours_state = plain.model.state_dict()
    theirs_state = {
        k: v
        for k, v in pilot_vit.state_dict().items()
        if "ssf_" not in k and k != "Prompt_Tokens" and not k.startswith("head.")
    }
    same_state = _same_state(ours_state, theirs_state)
    trainable = any("ssf_" in k or k == "Prompt_Tokens" for k, _ in pilot_vit.named_parameters())
    ours_model, counts = _transplant(adapted, pilot_vit) if trainable else (adapted, {})
    with _eval_mode(ours_model, pilot_vit):
        ours = torch.cat([ours_model(x) for x in inputs.split(batch)])
        theirs = torch.cat([pilot_features(x) for x in inputs.split(batch)])
    report: dict[str, Any] = {
        "state_dict_equal": bool(same_state),
        "tensors_compared": len(ours_state),
        "images": len(inputs),
        "feature_dim": int(ours.shape[1]),
        **feature_gap(ours, theirs),
    }
    if counts:
        report["transplanted"] = counts
    return report


# ---- comparison ----------------------------------------------------------------------------------------------
def _cil_predictions(
    calls: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], stream: cil.Stream
) -> list[dict[int, tuple[np.ndarray, np.ndarray]]]:
    """``[step] -> {original test index: (label, prediction)}`` as an array pair keyed per image."""
    steps = []
    for call in calls:
        step: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for preds, target, task_ids in call:
            task = stream.tasks[int(task_ids[0])]
            _, indices = _underlying(task.test)
            for original, label, pred in zip(indices, target.tolist(), preds.tolist(), strict=True):
                step[original] = (label, pred)
        steps.append(step)
    return steps


def _accuracy(step: dict[int, tuple[Any, Any]]) -> float:
    return 100.0 * float(np.mean([label == pred for label, pred in step.values()]))


def side_table(report: dict[str, Any], sides: Sequence[str]) -> list[str]:
    """Markdown rows: per side, the accuracy after every step, A-bar, A_last, wall and CPU time."""
    steps = len(report[sides[0]]["seen_accuracy"])
    head = "| side | " + " | ".join(f"step {i + 1}" for i in range(steps)) + " | A-bar | A_last | wall (s) | CPU (s) |"
    rows = [head, "|---" * (steps + 5) + "|"]
    for side in sides:
        r = report[side]
        cells = " | ".join(f"{v:.2f}" for v in r["seen_accuracy"])
        rows.append(
            f"| {side} | {cells} | {r['avg_incremental_acc']:.2f} | {r['last_acc']:.2f} | {r['wall_s']:.1f} "
            f"| {r['cpu_s']:.1f} |"
        )
    return rows


def _markdown(report: dict[str, Any]) -> str:
    rows = side_table(report, ("cil", "pilot"))
    dis = " | ".join(str(d) for d in report["disagreements_per_step"])
    rows.append(f"| images that disagree | {dis} | {report['disagreements']} (total) | | | |")
    return "\n".join(rows)


# ---- main ----------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pilot", type=Path, required=True, help="an unmodified LAMDA-PILOT checkout")
    parser.add_argument("--method", choices=sorted(METHODS), default="simplecil")
    parser.add_argument("--config", type=Path, help="cil config (default: the method's offline config)")
    parser.add_argument("--base", type=int, default=0, help="classes in the first task (0: increment)")
    parser.add_argument("--increment", type=int, default=5, help="classes per later task (PILOT needs >= 5 first)")
    parser.add_argument("--seed", type=int, default=1993, help="class order and initialisation, both sides")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/reference/simplecil"))
    parser.add_argument("--train-per-class", type=int, help="stream cap (default: the config's)")
    parser.add_argument("--test-per-class", type=int, help="stream cap (default: the config's)")
    parser.add_argument("--epochs", type=int, help="training epochs per task, both sides (PILOT's tuned_epoch)")
    parser.add_argument("--batch-size", type=int, help="training batch size, both sides (PILOT's batch_size)")
    parser.add_argument("--lr", type=float, help="APER: adaptation learning rate, both sides (PILOT's init_lr)")
    parser.add_argument("--img-size", type=int, default=32, help="MOS / APER: the seeded ViT-B/16's input size")
    parser.add_argument("--backbone-seed", type=int, default=0, help="MOS / APER: seed of the ViT-B/16's random init")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="cil method init_args (YAML value)"
    )
    options = parser.parse_args(argv)
    spec = METHODS[options.method]
    pilot_root = options.pilot.resolve()
    out = options.out.resolve()
    for sub in ("cil", "pilot"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "pilot").mkdir(parents=True)
    if (options.base or options.increment) < 5:
        raise ValueError("PILOT's top-5 accuracy needs >= 5 classes in the first task: raise --base / --increment")

    # our side, built as `cil run` builds it
    config_path = options.config or REPO / spec.cil_config
    config = _load_config(config_path, options.base, options.increment, options.seed, options.device)
    init_args = config["method"].setdefault("init_args", {})
    data = config.setdefault("data", {})
    for key in ("train_per_class", "test_per_class"):
        if getattr(options, key) is not None:
            config["stream"][key] = getattr(options, key)
    if spec.aper:  # every value the authors' json sets, on our side too (then the command line's, on both)
        aper_args, aper_data = _aper_hyperparameters(json.loads((pilot_root / "exps" / spec.pilot_json).read_text()))
        init_args.update(aper_args)
        data.update(aper_data)
    if options.epochs is not None:
        init_args["epochs"] = options.epochs
    if options.lr is not None:
        init_args["lr"] = options.lr
    if options.batch_size is not None:
        data["batch_size"] = options.batch_size
    for item in options.set:
        key, _, value = item.partition("=")
        init_args[key] = yaml.safe_load(value)
    state: dict[str, torch.Tensor] = {}
    if spec.seeded_vit:
        weights = _seeded_vit_b16(
            out.parent / f"vit_b16_{options.img_size}px_seed{options.backbone_seed}.pth",
            options.backbone_seed,
            options.img_size,
        )
        config["backbone"] = {
            "name": VIT_B16,
            "checkpoint_path": str(weights),
            "model_kwargs": {"img_size": options.img_size},
        }
        if options.method == "mos":
            data["eval_batch_size"] = 3 * int(data["batch_size"])  # PILOT's MOS: _compute_mean's batch_size * 3
        else:  # PILOT's APER: test and prototype loaders use batch_size
            data["eval_batch_size"] = int(data["batch_size"])
        state = torch.load(weights, map_location="cpu", weights_only=True)
    stream = cil.build_stream(config["stream"], seed=options.seed)
    backbone = cil.Backbone(**config["backbone"])
    # never injected (APER injects into its own copy, method.adapted; MOS into the backbone it is given)
    plain_backbone = cil.Backbone(**config["backbone"]) if options.method == "mos" else backbone
    method = _build_method(config, backbone)
    config["method_name"] = type(method).__name__.lower()
    engine = cil.Engine(
        method,
        stream,
        out / "cil",
        trainer_factory=cil.make_trainer_factory(out / "cil", config["trainer"], logger="none"),
        data=DataConfig(**config.get("data", {})),
        seed=options.seed,
        config=config,
    )
    train, _ = _underlying(stream.tasks[0].train)
    test, _ = _underlying(stream.tasks[0].test)
    order = [c for task in stream for c in task.metadata["original_classes"]]

    # PILOT, patched at its data and backbone entry points
    pilot = _import_pilot(pilot_root)
    args = _pilot_args(pilot_root, spec, options.base, options.increment, options.seed, options.device, backbone.name)
    if options.epochs is not None:
        args["tuned_epoch"] = options.epochs
    if options.batch_size is not None:
        args["batch_size"] = options.batch_size
    if options.lr is not None:
        args["init_lr"] = options.lr
    if spec.pilot_backbone == "vpt" and args["vpt_type"] not in options.method:
        raise ValueError(f"{spec.pilot_json} sets vpt_type {args['vpt_type']!r}, not what {options.method} adapts")
    get_idata = _make_idata(pilot, train, test, engine.train_transform, engine.eval_transform)
    learners: list[Any] = []
    tuned_inits: dict[str, nn.Module] = {}
    pilot_calls: list[tuple[np.ndarray, np.ndarray]] = []
    original_get_model = pilot["utils.factory"].get_model

    def get_model(model_name: str, model_args: dict[str, Any]) -> Any:
        learner = original_get_model(model_name, model_args)
        eval_cnn = learner._eval_cnn

        def recorded_eval_cnn(loader: Any) -> tuple[np.ndarray, np.ndarray]:
            y_pred, y_true = eval_cnn(loader)
            pilot_calls.append((y_pred[:, 0].copy(), y_true.copy()))
            return y_pred, y_true

        learner._eval_cnn = recorded_eval_cnn
        learners.append(learner)
        if spec.aper:  # the branch it will tune, before training
            tuned_inits["pilot"] = copy.deepcopy(learner._network.backbone)
        return learner

    report: dict[str, Any] = {
        "method": options.method,
        "pilot_commit": _git_head(pilot_root),
        "pilot_args": {k: v for k, v in args.items() if k != "config"},
        "cil_config": config,
        "stream": {"name": stream.name, "tasks": [list(t.classes) for t in stream], "order": order},
    }
    patches: list[contextlib.AbstractContextManager[None]] = [
        _patched(pilot["utils.data_manager"], "_get_idata", get_idata),
        _patched(pilot["utils.factory"], "get_model", get_model),
    ]
    if spec.seeded_vit:
        patches += _pilot_vit_patches(spec.pilot_backbone, pilot["utils.inc_net"], state, options.img_size)
    else:
        patches.append(_patched(pilot["utils.inc_net"], "get_backbone", _make_get_backbone(backbone)))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        # checks, before anything is learned
        check_args = {**args, "device": [torch.device("cpu" if options.device == "cpu" else "cuda:0")]}
        dm = pilot["utils.data_manager"].DataManager(
            args["dataset"], True, options.seed, args["init_cls"], args["increment"], check_args
        )
        inputs = _check_inputs(dm, stream, engine.eval_transform, train, test)
        tensors = inputs.pop("tensors")
        eval_batch = int(data.get("eval_batch_size", 64))
        if options.method == "mos":
            network = pilot["utils.inc_net"].MOSNet({**check_args, "nb_classes": dm.nb_classes}, True)
            backbone_check = _check_vit_mos_backbone(plain_backbone, backbone, network.backbone, tensors, eval_batch)
        elif spec.aper:
            network = pilot["utils.inc_net"].SimpleVitNet(check_args, True)  # what its Learner builds and tunes
            adapted = cast(cil.Backbone, method.adapted)
            if options.method == "aper_adapter":
                backbone_check = _check_vit_mos_backbone(
                    plain_backbone, adapted, network.backbone, tensors, eval_batch, network.extract_vector
                )
            else:
                backbone_check = _check_tuned_branch(
                    plain_backbone, adapted, network.backbone, network.extract_vector, tensors, eval_batch
                )
            # the plain PTM branch of its dual-branch network: timm's model, as ours, so bit for bit
            ptm = pilot["utils.inc_net"].get_backbone({**check_args, "backbone_type": "pretrained_vit_b16_224"})
            ptm_net = argparse.Namespace(backbone=ptm, extract_vector=ptm)
            backbone_check["ptm_branch"] = _check_backbone(plain_backbone, ptm_net, tensors, eval_batch)
        else:
            network = pilot["utils.inc_net"].SimpleVitNet(check_args, True)
            backbone_check = _check_backbone(backbone, network, tensors, eval_batch)
        checks: dict[str, Any] = {
            "class_order": {"cil": order, "pilot": list(dm._class_order), "equal": order == list(dm._class_order)},
            "task_sizes": {"cil": [t.num_classes for t in stream], "pilot": list(dm._increments)},
            "inputs": inputs,
            "backbone": backbone_check,
        }
        report["checks"] = checks
        print(json.dumps(checks, indent=2), file=sys.stderr)
        bb = checks["backbone"]
        features_ok = bb["bit_identical_rows"] == bb["images"]
        if spec.seeded_vit:  # theirs: q/k/v matmuls + softmax; timm: fused qkv + SDPA. Equal up to fp32 rounding
            features_ok = bb["max_rel_diff"] < 1e-5
            if "injected_vs_plain_bit_identical_rows" in bb:  # adapters at init (up = 0) add exact zeros
                features_ok &= bb["injected_vs_plain_bit_identical_rows"] == bb["images"]
            if "transplanted" in bb:  # every PEFT parameter of theirs found its place in ours, and no other
                features_ok &= (
                    bb["transplanted"]["theirs"] == bb["transplanted"]["ours"] == bb["transplanted"]["copied"]
                )
        if "ptm_branch" in bb:
            ptm_check = bb["ptm_branch"]
            features_ok &= ptm_check["state_dict_equal"] and ptm_check["bit_identical_rows"] == ptm_check["images"]
        identical = (
            checks["class_order"]["equal"]
            and checks["task_sizes"]["cil"] == checks["task_sizes"]["pilot"]
            and inputs["same_images"]
            and inputs["bit_identical"] == inputs["images_cil"]
            and inputs["pilot_labels_follow_order"]
            and bb["state_dict_equal"]
            and features_ok
        )
        report["checks"]["passed"] = bool(identical)
        if not identical:
            _write(out, report)
            print("inputs or backbone differ: nothing was trained (see report.json)", file=sys.stderr)
            return 1
        test_tensors = tensors[
            : sum(len(_underlying(t.test)[1]) for t in stream)
        ]  # sorted keys: every ('test', i) first
        del network, tensors, dm, plain_backbone

        # PILOT's own driver
        started, cpu = time.perf_counter(), _cpu_seconds()
        with _cwd(out / "pilot"):
            pilot["trainer"]._train(dict(args))
        pilot_wall, pilot_cpu = time.perf_counter() - started, _cpu_seconds() - cpu

    started, cpu = time.perf_counter(), _cpu_seconds()
    if spec.aper:
        tuned_inits["cil"] = copy.deepcopy(cast(nn.Module, method.adapted))
    with _recording_engine() as calls:
        summary = engine.run()
    cil_wall, cil_cpu = time.perf_counter() - started, _cpu_seconds() - cpu

    if len(calls) != len(stream):
        raise RuntimeError(
            f"recorded {len(calls)} evaluations of cil for {len(stream)} tasks: cil.engine no longer scores through "
            "cil.engine.TaskAccuracy; update _recording_engine"
        )
    ours = _cil_predictions(calls, stream)
    theirs: list[dict[int, tuple[Any, Any]]] = []
    dm_run = learners[0].data_manager
    for step, (y_pred, y_true) in enumerate(pilot_calls):
        seen = sum(t.num_classes for t in stream.tasks[: step + 1])
        originals = _pilot_indices(dm_run._test_targets, list(range(seen)))
        theirs.append({int(o): (int(t), int(p)) for o, t, p in zip(originals, y_true, y_pred, strict=True)})
    if len(ours) != len(theirs) or any(a.keys() != b.keys() for a, b in zip(ours, theirs, strict=True)):
        raise RuntimeError("the two sides evaluated different test images; see predictions.csv")
    rows = []
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for original in sorted(a):
            label, cil_pred = a[original]
            pilot_label, pilot_pred = b[original]
            rows.append(
                {
                    "step": step,
                    "test_index": original,
                    "label": label,
                    "pilot_label": pilot_label,
                    "cil_pred": cil_pred,
                    "pilot_pred": pilot_pred,
                }
            )
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "predictions.csv", index=False)
    disagree = frame.assign(differ=frame.cil_pred != frame.pilot_pred).groupby("step")["differ"].sum()
    pilot_seen = [_accuracy(step) for step in theirs]
    cil_seen = [_accuracy(step) for step in ours]
    report["cil"] = {
        "seen_accuracy": cil_seen,
        "avg_incremental_acc": float(np.mean(cil_seen)),
        "last_acc": cil_seen[-1],
        "summary_avg_incremental_acc": summary["avg_incremental_acc"],
        "summary_last_acc": summary["last_acc"],
        "wall_s": cil_wall,
        "cpu_s": cil_cpu,
    }
    report["pilot"] = {
        "seen_accuracy": pilot_seen,
        "avg_incremental_acc": float(np.mean(pilot_seen)),
        "last_acc": pilot_seen[-1],
        "wall_s": pilot_wall,
        "cpu_s": pilot_cpu,
    }
    report["labels_agree"] = bool((frame.label == frame.pilot_label).all())
    report["disagreements_per_step"] = [int(v) for v in disagree.tolist()]
    report["disagreements"] = int(disagree.sum())
    report["prototypes"] = _prototype_gap(method, learners[0]) if not spec.seeded_vit else {}
    if spec.aper:
        report["tuned_branch"] = _tuned_movement(method, learners[0], tuned_inits, test_tensors, eval_batch)
    if options.method == "aper_adapter":
        report["adapter_up_abs_max"] = _adapter_movement(method, learners[0])
    _write(out, report)
    print(_markdown(report))
    return 0 if report["disagreements"] == 0 or options.method != "simplecil" else 1


@torch.no_grad()
def _prototype_gap(method: cil.CILMethod, learner: Any) -> dict[str, Any]:
    """Largest difference between the class prototypes of the two sides (SimpleCIL: both hold one per class)."""
    head = getattr(method, "head", None)
    prototypes = getattr(head, "prototypes", None)
    fc = getattr(learner._network, "fc", None)
    if prototypes is None or fc is None:
        return {}
    theirs = fc.weight.detach().cpu()[: len(prototypes)]
    diff = (prototypes.cpu() - theirs).abs()
    return {"max_abs_diff": float(diff.max()), "bit_identical_rows": int((diff == 0).all(dim=1).sum())}


@torch.no_grad()
def _adapter_movement(method: cil.CILMethod, learner: Any) -> dict[str, float]:
    """APER: largest |weight| of the adapters' up-projections after adaptation (0 at init on both sides), i.e. how far
    the adapted branch has moved from the PTM."""
    ours = [p for n, p in method.named_parameters() if n.startswith("adapted.") and n.endswith("adapter.up.weight")]
    tuned = learner._network.backbones[-1]  # the dual-branch network's adapted ViT
    theirs = [p for n, p in tuned.named_parameters() if n.endswith("adaptmlp.up_proj.weight")]
    return {
        "cil": max((float(p.abs().max()) for p in ours), default=float("nan")),
        "pilot": max((float(p.abs().max()) for p in theirs), default=float("nan")),
    }


@torch.no_grad()
def _tuned_movement(
    method: cil.CILMethod, learner: Any, inits: dict[str, nn.Module], inputs: torch.Tensor, batch: int
) -> dict[str, Any]:
    """APER: how far first-task tuning moved the tuned branch, the same measures on both sides: the mean and the
    smallest cosine similarity, over the test images, between the tuned branch's embedding and (``vs_init``) its own
    before training, and (``vs_ptm``) the PTM's (1: not at all). SSF starts away from the PTM (random scales and
    shifts), the others at it."""

    def cosines(a: nn.Module, b: nn.Module) -> dict[str, float]:
        device = next(a.parameters()).device
        values = torch.cat(
            [
                torch.nn.functional.cosine_similarity(a(x.to(device)), b(x.to(device)), dim=-1).cpu()
                for x in inputs.split(batch)
            ]
        )
        return {"mean_cosine": float(values.mean()), "min_cosine": float(values.min())}

    sides = {
        "cil": (method.backbone, cast(nn.Module, method.adapted), inits["cil"]),
        "pilot": (learner._network.backbones[0], learner._network.backbones[-1], inits["pilot"]),
    }
    report: dict[str, Any] = {}
    for side, (ptm, tuned, init) in sides.items():
        with _eval_mode(ptm, tuned, init):
            report[side] = {"vs_init": cosines(init, tuned), "vs_ptm": cosines(ptm, tuned)}
    return report


def _git_head(root: Path) -> str | None:
    head = root / ".git"
    if not head.exists():
        return None
    import subprocess

    result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or None


def _write(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    if "cil" in report:
        (out / "table.md").write_text(_markdown(report) + "\n")


if __name__ == "__main__":
    sys.exit(main())
