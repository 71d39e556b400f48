"""Side by side with the authors' code: an unmodified LAMDA-PILOT checkout next to ``cil`` on identical inputs.

    python benchmarks/reference/pilot_side_by_side.py --pilot /tmp/pilot --method simplecil \
        --out runs/reference/simplecil
    python benchmarks/reference/pilot_side_by_side.py --pilot /tmp/pilot --method mos --train-per-class 20 \
        --test-per-class 10 --epochs 2 --seed 1993 --out runs/reference/mos_seed1993
    python benchmarks/reference/pilot_side_by_side.py --pilot /tmp/pilot --method aper_adapter --train-per-class 20 \
        --test-per-class 10 --epochs 2 --batch-size 48 --seed 1993 --out runs/reference/aper_adapter_seed1993
    python benchmarks/reference/pilot_side_by_side.py --pilot /tmp/pilot --method l2p --train-per-class 20 \
        --test-per-class 16 --epochs 2 --batch-size 16 --seed 1993 --set batchwise_selection=true \
        --out runs/reference/l2p_bw_seed1993
    python benchmarks/reference/pilot_side_by_side.py --pilot /tmp/pilot --method coda_prompt --config-backbone \
        --train-per-class 32 --test-per-class 16 --epochs 3 --batch-size 16 --seed 1993 \
        --out runs/reference/coda_dino_seed1993
    python benchmarks/reference/pilot_side_by_side.py --pilot /tmp/pilot --method ranpac --train-per-class 32 \
        --test-per-class 16 --seed 1993 --out runs/reference/ranpac_seed1993

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

* L2P: PILOT's ``get_backbone`` and ``PromptVitNet`` run unchanged; both of its ``vit_l2p`` ViTs (the prompted one
  and ``original_backbone``, the query) come from ``timm.create_model("vit_base_patch16_224_l2p")``, whose
  ``_create_vision_transformer`` (timm-0.6 registry calls) is replaced by ``vit_l2p.VisionTransformer(img_size=...,
  **kwargs)`` plus the seeded weights passed through vit_l2p's own ``checkpoint_filter_fn`` (which repeats the class
  token's position embedding for the 25 prompt slots, as its npz loader does). ``--l2p-config-backbone`` keeps the
  ``cil`` config's ViT instead (e.g. the offline DINOv2 ViT-S/14 at 112 px): vit_l2p is then built in its shape
  (patch, width, depth, heads, LayerScale) and given its weights. ``exps/l2p.json``'s ``batchwise_prompt`` is set to
  ``cil``'s ``batchwise_selection`` (``--set batchwise_selection=true`` for the json's value), so both sides select
  alike; ``data.eval_batch_size`` = ``batch_size`` (PILOT's L2P test loader). Before training (``_l2p_checks``),
  PILOT's initial prompt pool and head rows are copied into a copy of ``cil``'s L2P, and one training step is made on
  each side through its own code (PILOT's ``Learner._init_train`` on a one-batch loader with its ``get_optimizer``;
  ``cil``'s ``training_step`` and ``configure_optimizers``), in task 1 and in task 2 (old classes masked): query,
  chosen prompt ids, pull term, logits, loss, gradients and the parameters after the Adam step must agree to fp32
  rounding; so must the evaluation logits of task 1's test images in PILOT's batches, and, for batch-wise selection,
  both sides' evaluation batches must hold the same images (choose ``--test-per-class`` a multiple of
  ``--batch-size``). ``--accept-prompt-ties`` lets a run go on where the chosen prompts differ only by how a tie of
  batch votes is broken (recorded in ``report.json``).
* CODA-Prompt: PILOT's ``get_backbone``, ``CodaPromptVitNet``, ``CodaPrompt`` and ``Learner`` run unchanged; its
  ``vit_coda_promtpt`` ViT gets the seeded ViT-B/16 or, with ``--config-backbone`` (the generalised
  ``--l2p-config-backbone``, which still works), the ``cil`` config's ViT: its ``_create_vision_transformer`` is
  replaced as vit_l2p's is, and since its Block has no LayerScale, DINOv2's gammas are folded into ``attn.proj`` /
  ``mlp.fc2`` (``fold_layer_scale``; the same function up to fp32 rounding). Two further run-time patches, both
  needed for it to run at all here: the module sees a ``torch`` whose ``zeros(..., requires_grad=True)`` is a
  non-leaf (its forward adds in place to ``torch.zeros((1,), requires_grad=True).to(device)``, which on the CPU is
  the leaf itself and raises; on a GPU ``.to`` copies), and, for a ViT narrower than 768, ``models.coda_prompt``
  builds a subclass of ``CodaPromptVitNet`` that re-makes its ``fc`` and ``CodaPrompt`` (both hard-coded at 768)
  at the ViT's width. ``exps/coda_prompt.json`` as is (Adam 0.001, cosine, 100 components of 8 tokens, ortho 0;
  ``tuned_epoch`` / ``batch_size`` from the command line); its train loader drops the last incomplete batch, so
  choose ``--train-per-class`` x classes per task a multiple of ``--batch-size``. Before training
  (``_coda_checks``): the json's values vs ``cil``'s, the learning rate of every epoch (their ``CosineSchedule``
  vs our ``LambdaLR``), components per task (their ``int(100 / nb_tasks)``, ours ``pool_size // tasks``); PILOT's
  initial components, keys, attention vectors and head rows are copied into a copy of ``cil``'s CODA-Prompt and one
  training step is made on each side through its own code in task 1 and task 2 (task 2 from PILOT's stepped task-1
  state, after its ``process_task_count`` allocated the second slice under a fixed seed): query, per block the
  weights ``alpha = cos(q * A, K)`` (read from their einsum) and the prompt, logits, loss, gradients of every
  trained tensor, parameters after the Adam step, earlier components and other head rows unmoved. The allocation
  itself is compared tensor by tensor from the same ``torch.manual_seed`` (their ``gram_schmidt`` vs
  ``cil.layers.gram_schmidt_rows``), and as a whole procedure (the two sides draw the tensors in different orders).
  Evaluation logits of task 1's test images must agree too.
* RanPAC and FeCAM (``FROZEN_PORTS``): compared on frozen features. PILOT is handed a copy of ``cil``'s backbone (as
  for SimpleCIL), its first session is off (``tuned_epoch`` 0, and its ``Learner._init_train`` is skipped: with no
  epoch its closing ``logging.info(info)`` reads a name only the loop sets), and ``cil`` is set to what PILOT's port
  computes (RanPAC ``adapt: none, readout: cosine``; FeCAM ``adapt: none``, statistics of raw features normalised at
  the distance, ``S + 100 I``, ``torch.corrcoef`` of it); ``args["M"]`` is ``cil``'s ``projection_dim``. RanPAC's
  ``optimise_ridge_parameter`` is wrapped to record its inputs and choice; ``cil`` then takes PILOT's ``W_rand`` and
  its lambda per task, and ``cil.ridge.select_ridge`` must choose the same lambda on PILOT's recorded features. After
  the stream: Gram matrix and readout (RanPAC), class means, precisions and the distances of every test image to
  every class (FeCAM), in ``report.json``.

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
import torch.nn.functional as F
import yaml
from torch import nn

import cil
import cil.engine
from cil.data import ArrayDataset, DataConfig, Transformed
from cil.metrics import TaskAccuracy
from cil.task import LabelMapped, Task

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
    "l2p": MethodSpec("l2p.json", "configs/experiments/l2p_offline.yaml", "vit_l2p"),
    "coda_prompt": MethodSpec(
        "coda_prompt.json",
        "configs/experiments/coda_prompt_offline.yaml",
        "vit_coda_promtpt",  # sic: PILOT's name
    ),
    "ranpac": MethodSpec("ranpac.json", "configs/experiments/ranpac_offline.yaml"),
    "fecam": MethodSpec("fecam.json", "configs/experiments/fecam_offline.yaml"),
}
CONFIG_BACKBONE_METHODS = ("l2p", "coda_prompt")
# Methods compared on the frozen features of cil's own backbone (PILOT gets a copy, as for SimpleCIL), with PILOT's
# first-session training off (tuned_epoch 0) and cil set to what PILOT's port computes (see the module docstring).
FROZEN_PORTS: dict[str, dict[str, Any]] = {
    "ranpac": {"adapt": "none", "readout": "cosine"},
    "fecam": {
        "adapt": "none",
        "features": "normalize_at_distance",
        "shrink": 100.0,
        "shrink_relative": False,
        "shrink_off_diagonal": 0.0,
        "covariance_normalization": "row_correlation",
    },
}  # PILOT's ViT rebuilt in the shape of the cil config's
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
    if not spec.seeded_vit:  # MOS / APER / L2P keep their json's: their get_backbone branches on the name
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
        if name in (f"{VIT_B16}_ssf", f"{VIT_B16}_l2p", f"{VIT_B16}_coda_prompt"):  # registered by PILOT's vit_ssf
            # / vit_l2p / vit_coda_promtpt, whose weight loading the harness replaces
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


def _vit_b16_kwargs(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments a PILOT ViT factory passes on, without timm 1.x's registry arguments; refuses any
    variant but ViT-B/16 (the only weights the harness provides)."""
    if variant != VIT_B16:
        raise ValueError(f"the harness provides weights for {VIT_B16!r} only, PILOT asked for {variant!r}")
    return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}


def _pilot_vit_patches(
    pilot_backbone: str,
    inc_net: Any,
    state: dict[str, torch.Tensor],
    img_size: int,
    architecture: dict[str, Any] | None = None,
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
    * ``timm``: nothing beyond the shim (APER with fine-tuning: PILOT tunes timm's own ViT);
    * ``vit_l2p``: its ``_create_vision_transformer`` (timm-0.6 registry calls) is replaced by
      ``vit_l2p.VisionTransformer(img_size=..., **kwargs)`` (``architecture`` overriding ViT-B/16's shape) and the
      weights through vit_l2p's own ``checkpoint_filter_fn`` (prompt slots get the class token's position);
    * ``vit_coda_promtpt``: likewise (see :func:`_coda_patches`; LayerScale folded into the weights).

    ``utils.inc_net`` always sees the shim as ``timm``: APER's dual-branch network asks
    ``get_backbone("pretrained_vit_b16_224")`` for the plain PTM, which is ``timm.create_model("vit_base_patch16_224",
    pretrained=True, num_classes=0)`` there."""
    shim = _TimmWithLocalWeights(state, img_size)
    patches: list[contextlib.AbstractContextManager[None]] = [_patched(inc_net, "timm", shim)]
    if pilot_backbone == "vit_ssf":
        module = importlib.import_module("backbone.vit_ssf")

        def create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
            kwargs = _vit_b16_kwargs(variant, kwargs)
            return _load_seeded(module.VisionTransformer(img_size=img_size, **kwargs), state, ("ssf_",))

        return [*patches, _patched(module, "_create_vision_transformer", create)]
    if pilot_backbone == "vit_l2p":
        module = importlib.import_module("backbone.vit_l2p")

        def create_l2p(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
            kwargs = _vit_b16_kwargs(variant, kwargs)
            kwargs.update(architecture or {})  # --l2p-config-backbone: the shape of cil's ViT instead of ViT-B/16
            model = module.VisionTransformer(img_size=img_size, **kwargs)
            if not pretrained:
                return model
            # their own filter: pos_embed resized for the prompt slots (the class token's, repeated)
            return _load_seeded(model, module.checkpoint_filter_fn(dict(state), model), ("prompt.",))

        return [*patches, _patched(module, "_create_vision_transformer", create_l2p)]
    if pilot_backbone == "vit_coda_promtpt":
        return [*patches, *_coda_patches(inc_net, state, img_size, architecture)]
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


def _vit_architecture(vit: Any) -> dict[str, Any]:
    """The constructor arguments of PILOT's (timm-0.6-style) ``VisionTransformer`` that rebuild a plain timm ViT
    (``--config-backbone``): patch size, width, depth, heads, MLP ratio, q/k/v bias and LayerScale."""
    block = vit.blocks[0]
    layer_scale = not isinstance(block.ls1, nn.Identity)
    return {
        "patch_size": int(vit.patch_embed.patch_size[0]),
        "embed_dim": int(vit.embed_dim),
        "depth": len(vit.blocks),
        "num_heads": int(block.attn.num_heads),
        "mlp_ratio": block.mlp.fc1.out_features / vit.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "init_values": 1e-5 if layer_scale else None,  # the loaded gammas replace it
    }


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


# ---- L2P -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def _check_l2p_backbone(
    plain: cil.Backbone, method: cil.CILMethod, network: nn.Module, inputs: torch.Tensor, batch: int
) -> dict[str, Any]:
    """L2P before training: PILOT's ``PromptVitNet`` holds two ``vit_l2p`` ViTs, the prompted one and
    ``original_backbone`` (the query). Both must hold ``cil``'s weights (the prompted one's ``pos_embed`` with the
    class token's position repeated for the 25 prompt slots, as their ``resize_pos_embed`` makes it), and the query,
    ``original_backbone(x)["pre_logits"]`` vs ``cil``'s ``L2P.query`` (the frozen ViT's final-norm class token), must
    agree to fp32 rounding (their attention: ``q @ k.T``, softmax, ``@ v``; timm's: SDPA)."""
    ours = plain.model.state_dict()
    original = {k: v for k, v in network.original_backbone.state_dict().items() if not k.startswith("head.")}
    prompted = {k: v for k, v in network.backbone.state_dict().items() if not k.startswith(("prompt.", "head."))}
    slots = prompted["pos_embed"].shape[1] - ours["pos_embed"].shape[1]
    expected_pos = torch.cat([ours["pos_embed"][:, :1].expand(-1, slots + 1, -1), ours["pos_embed"][:, 1:]], dim=1)
    query = cast(Callable[[torch.Tensor], torch.Tensor], method.query)
    with _eval_mode(plain, network):
        theirs = torch.cat([network.original_backbone(x)["pre_logits"] for x in inputs.split(batch)])
        mine = torch.cat([query(x) for x in inputs.split(batch)])
    return {
        "state_dict_equal": _same_state(ours, original) and _same_state({**ours, "pos_embed": expected_pos}, prompted),
        "original_backbone_state_equal": _same_state(ours, original),
        "prompted_backbone_state_equal": _same_state({**ours, "pos_embed": expected_pos}, prompted),
        "prompt_slots": int(slots),
        "tensors_compared": len(ours),
        "images": len(inputs),
        "feature_dim": int(mine.shape[1]),
        **feature_gap(mine, theirs),
    }


def _l2p_transplant(method: cil.CILMethod, network: nn.Module, known: int, total: int) -> Any:
    """A copy of ``cil``'s L2P as it stands in a task with classes ``known..total-1`` (head grown to ``total``
    rows), holding PILOT's current prompt pool (keys ``[P, D]``, prompts ``[P, L, D]``) and head rows."""
    ours: Any = copy.deepcopy(method)
    ours.log = lambda *args, **kwargs: None  # training_step outside a Trainer
    ours.seen_classes, ours.new_classes = list(range(total)), list(range(known, total))
    if ours.head.num_classes < total:
        ours.head.expand(total - ours.head.num_classes)
    prompt, head = network.backbone.prompt, network.backbone.head
    with torch.no_grad():
        ours.pool.keys.copy_(prompt.prompt_key)
        ours.pool.prompts.copy_(prompt.prompt)
        ours.head.weight.copy_(head.weight[:total])
        ours.head.bias.copy_(head.bias[:total])
    return ours


def _gap(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    diff = (ours.detach().float() - theirs.detach().float()).abs()
    scale = theirs.detach().float().abs().max()
    return {"max_abs_diff": float(diff.max()), "max_rel_diff": float(diff.max() / scale) if scale > 0 else 0.0}


def _check_l2p_step(
    method: cil.CILMethod, learner: Any, x: torch.Tensor, y: torch.Tensor, known: int, total: int
) -> dict[str, Any]:
    """One training step from the same state on the same batch, each side through its own code: PILOT's
    ``Learner._init_train`` (one epoch over a one-batch loader, its own optimizer from ``get_optimizer``) and
    ``cil``'s ``training_step`` + ``configure_optimizers``. Compared: the query, the chosen prompt ids, the pull term
    (``reduce_sim``), the logits, the loss, the gradient of every trained tensor and the tensors after the step."""
    learner = copy.deepcopy(learner)
    net = learner._network
    learner._cur_task = 0 if known == 0 else 1
    learner._known_classes, learner._total_classes = known, total
    ours = _l2p_transplant(method, net, known, total)
    before = {n: p.detach().clone() for n, p in net.backbone.named_parameters() if p.requires_grad}
    recorded: dict[str, Any] = {}
    forward = net.forward

    def recording_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            recorded["query"] = net.original_backbone(args[0])["pre_logits"].clone()
        out = forward(*args, **kwargs)
        recorded["out"] = out  # their loop then writes -inf into out["logits"][:, :known], in place
        return out

    net.forward = recording_forward
    optimizer = learner.get_optimizer()
    theirs_trained = {n for n, p in net.named_parameters() if p.requires_grad}
    learner.args = {**learner.args, "tuned_epoch": 1}
    learner._init_train([(None, x, y)], None, optimizer, None)
    out = recorded["out"]
    theirs_logits = out["logits"][:, :total].detach()
    theirs_loss = F.cross_entropy(theirs_logits, y.long()) - learner.args["pull_constraint_coeff"] * out["reduce_sim"]

    ours.train()
    opt = ours.configure_optimizers()
    ours_trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    query = ours.query(x)
    _, ids, pull = ours.pool.select(query)
    z, _ = ours.prompted(x)
    logits = ours.head(z)
    loss = ours.training_step((x, y), 0)
    opt.zero_grad()
    loss.backward()
    names = {"pool.keys": "prompt.prompt_key", "pool.prompts": "prompt.prompt", "head.weight": "head.weight"}
    names["head.bias"] = "head.bias"
    theirs_params = dict(net.backbone.named_parameters())
    ours_params = dict(ours.named_parameters())
    grads = {
        n: _gap(ours_params[n].grad, theirs_params[t].grad[:total] if n.startswith("head") else theirs_params[t].grad)
        for n, t in names.items()
    }
    opt.step()
    lr, eps = float(opt.param_groups[0]["lr"]), float(opt.param_groups[0]["eps"])  # see _coda_step: Adam's bound
    after = {
        n: {
            **_gap(ours_params[n], theirs_params[t][:total] if n.startswith("head") else theirs_params[t]),
            "adam_bound": lr * grads[n]["max_abs_diff"] / eps,
        }
        for n, t in names.items()
    }
    moved = (theirs_params["head.weight"].detach() - before["head.weight"]).abs().amax(dim=1)  # [rows]
    outside_moved = float(torch.cat([moved[:known], moved[total:]]).max()) if known or total < len(moved) else 0.0
    masked = logits.detach().clone()
    masked[:, :known] = float("-inf")
    top_k = int(out["prompt_idx"].shape[1])
    pool_size = int(out["similarity"].shape[1])
    votes = torch.bincount(out["similarity"].topk(top_k, dim=1).indices.flatten(), minlength=pool_size)  # [P]
    ours_ids, theirs_ids = set(ids[0].tolist()), set(out["prompt_idx"][0].tolist())
    # batch-wise: the ids that differ all hold the k-th largest vote count (a tie, broken differently)
    kth = int(votes.sort(descending=True).values[top_k - 1])
    tie_only = bool(ours_ids != theirs_ids and all(int(votes[i]) == kth for i in ours_ids ^ theirs_ids))
    return {
        "known": known,
        "total": total,
        "batch": len(y),
        "labels": sorted(set(y.tolist())),
        "trained_tensors": {
            "cil": sorted(f"{n} {list(ours_params[n].shape)}" for n in ours_trained),
            "pilot": sorted(f"{n} {list(dict(net.named_parameters())[n].shape)}" for n in theirs_trained),
        },
        "query": _gap(query, recorded["query"]),
        "chosen_ids_equal": bool(torch.equal(ids.sort(dim=1).values, out["prompt_idx"].sort(dim=1).values)),
        "chosen_ids_cil": ids[0].tolist(),
        "chosen_ids_pilot": out["prompt_idx"][0].tolist(),
        "distinct_id_sets": len({tuple(sorted(r)) for r in ids.tolist()}),
        "votes_per_prompt": votes.tolist(),  # how many images of the batch have each prompt in their own top k
        "ids_differ_by_tie_only": tie_only,
        "reduce_sim": {"cil": float(pull), "pilot": float(out["reduce_sim"]), **_gap(pull, out["reduce_sim"])},
        "logits": _gap(masked[:, known:], theirs_logits[:, known:]),
        "loss": {"cil": float(loss), "pilot": float(theirs_loss), **_gap(loss, theirs_loss)},
        "grad": grads,
        "after_step": after,
        "pilot_head_rows_outside_task_moved": outside_moved,  # earlier and future classes' rows: 0 expected
    }


@torch.no_grad()
def _check_l2p_eval(
    method: cil.CILMethod, network: nn.Module, inputs: torch.Tensor, batch: int, total: int
) -> dict[str, Any]:
    """Evaluation from the same state: PILOT's ``network(x)["logits"][:, :total]`` (eval mode) vs ``cil``'s
    ``forward`` with its head at ``total`` rows, on ``inputs`` in PILOT's test order and batches (batch-wise
    selection votes per batch); per batch, whether the chosen prompts are the same, or differ by a tie only."""
    ours = _l2p_transplant(method, network, 0, total)
    mine, theirs, ids_differ, tie_only = [], [], 0, 0
    with _eval_mode(ours, network):
        for x in inputs.split(batch):
            mine.append(ours(x))
            q = network.original_backbone(x)["pre_logits"]
            res = network.backbone(x, cls_features=q)
            theirs.append(res["logits"][:, :total])
            _, ids, _ = ours.pool.select(ours.query(x))
            a, b = set(ids[0].tolist()), set(res["prompt_idx"][0].tolist())
            if a != b:
                ids_differ += 1
                k = int(res["prompt_idx"].shape[1])
                votes = torch.bincount(
                    res["similarity"].topk(k, dim=1).indices.flatten(), minlength=res["similarity"].shape[1]
                )
                kth = int(votes.sort(descending=True).values[k - 1])
                tie_only += all(int(votes[i]) == kth for i in a ^ b)
    ours_logits, theirs_logits = torch.cat(mine), torch.cat(theirs)
    return {
        "images": len(inputs),
        "classes": total,
        "batches": len(mine),
        "batches_with_other_prompts": ids_differ,
        "of_which_tie_only": tie_only,
        "same_predictions": int((ours_logits.argmax(1) == theirs_logits.argmax(1)).sum()),
        **_gap(ours_logits, theirs_logits),
    }


def _step_batches(
    dm: Any, stream: cil.Stream, batch: int, seed: int
) -> Iterator[tuple[Task, int, torch.Tensor, torch.Tensor]]:
    """``(task, known, x, y)`` for the first two tasks: ``batch`` of the task's training images drawn with ``seed``
    through PILOT's data manager with the evaluation transform, so both sides step on the same tensors."""
    generator = torch.Generator().manual_seed(seed)
    known = 0
    for task in stream.tasks[:2]:
        data = dm.get_dataset(np.arange(known, known + task.num_classes), source="train", mode="test")
        pick = torch.randperm(len(data), generator=generator)[:batch].tolist()
        x = torch.stack([data[i][1] for i in pick])  # [batch, 3, H, W]
        y = torch.as_tensor([int(data[i][2]) for i in pick])  # [batch]
        yield task, known, x, y
        known += task.num_classes


def _first_task_test(dm: Any, stream: cil.Stream) -> tuple[int, torch.Tensor]:
    """The first task's class count and all its test images, as PILOT's data manager serves them."""
    first = stream.tasks[0].num_classes
    test = dm.get_dataset(np.arange(0, first), source="test", mode="test")
    return first, torch.stack([test[i][1] for i in range(len(test))])


def _l2p_checks(
    method: cil.CILMethod,
    learner: Any,
    dm: Any,
    stream: cil.Stream,
    batch: int,
    seed: int,
    batchwise: bool,
    accept_ties: bool = False,
) -> dict[str, Any]:
    """The L2P checks before training: one training step in the first task and in the second (old classes masked),
    each on a batch of ``batch`` training images drawn with ``seed`` (evaluation transform, so the same tensors on
    both sides); evaluation over the first task's test images; and, for batch-wise selection, that the two sides'
    evaluation batches hold the same images."""
    steps = [
        _check_l2p_step(method, learner, x, y, known, known + task.num_classes)
        for task, known, x, y in _step_batches(dm, stream, batch, seed)
    ]
    first, inputs = _first_task_test(dm, stream)
    evaluation = _check_l2p_eval(method, learner._network, inputs, batch, first)
    ours_batches = _eval_batches_cil(stream, batch)
    theirs_batches = _eval_batches_pilot(dm._test_targets, stream, batch)
    aligned = [set(a) == set(b) for a, b in zip(ours_batches, theirs_batches, strict=True)]

    def step_ok(step: dict[str, Any]) -> bool:
        if accept_ties and step["ids_differ_by_tie_only"]:  # nothing after the selection can agree then
            return True
        close = [step["query"], step["reduce_sim"], step["logits"], step["loss"]]
        return (
            step["chosen_ids_equal"]
            and all(v["max_rel_diff"] < 1e-5 for v in close)
            and all(v["max_rel_diff"] < 1e-4 for v in step["grad"].values())
            and all(
                v["max_rel_diff"] < 1e-4 or v["max_abs_diff"] <= v["adam_bound"] for v in step["after_step"].values()
            )
            and len(step["trained_tensors"]["cil"]) == len(step["trained_tensors"]["pilot"])
        )

    passed = (
        all(step_ok(s) for s in steps)
        and (
            (evaluation["same_predictions"] == evaluation["images"] and evaluation["max_rel_diff"] < 1e-5)
            or (accept_ties and evaluation["batches_with_other_prompts"] == evaluation["of_which_tie_only"] > 0)
        )
        and (all(aligned) or not batchwise)
    )
    return {
        "batchwise": batchwise,
        "steps": steps,
        "eval": evaluation,
        "eval_batches_aligned": aligned,
        "passed": bool(passed),
    }


def _eval_batches_pilot(targets: np.ndarray, stream: cil.Stream, batch: int) -> list[list[frozenset[int]]]:
    """Per step, PILOT's test batches (``shuffle=False`` over all seen classes, class by class) as sets of
    original test indices."""
    steps = []
    for step in range(len(stream)):
        seen = sum(t.num_classes for t in stream.tasks[: step + 1])
        order = _pilot_indices(targets, list(range(seen)))
        steps.append([frozenset(int(i) for i in order[k : k + batch]) for k in range(0, len(order), batch)])
    return steps


def _eval_batches_cil(stream: cil.Stream, batch: int) -> list[list[frozenset[int]]]:
    """Per step, ``cil``'s test batches (each seen task's test set on its own, in order) as sets of indices."""
    steps = []
    for step in range(len(stream)):
        batches = []
        for task in stream.tasks[: step + 1]:
            _, indices = _underlying(task.test)
            batches += [frozenset(int(i) for i in indices[k : k + batch]) for k in range(0, len(indices), batch)]
        steps.append(batches)
    return steps


# ---- CODA-Prompt ---------------------------------------------------------------------------------------------
CODA_WIDTH = 768  # what PILOT's CodaPromptVitNet hard-codes for its head and its CodaPrompt (emb_d, key_dim)


def fold_layer_scale(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT's weights with LayerScale folded into the layer before it, for a ViT without LayerScale (PILOT's
    ``vit_coda_promtpt`` Block): ``gamma * (W x + b) = (gamma W) x + gamma b``, so ``blocks.i.ls1.gamma`` scales the
    rows of ``attn.proj`` and ``ls2.gamma`` those of ``mlp.fc2``. The same function up to fp32 rounding."""
    folded = {k: v for k, v in state.items() if not k.endswith((".ls1.gamma", ".ls2.gamma"))}
    for key, gamma in state.items():
        if key.endswith((".ls1.gamma", ".ls2.gamma")):
            block, layer = key[: -len(".ls1.gamma")], "attn.proj" if ".ls1." in key else "mlp.fc2"
            folded[f"{block}.{layer}.weight"] = state[f"{block}.{layer}.weight"] * gamma[:, None]
            folded[f"{block}.{layer}.bias"] = state[f"{block}.{layer}.bias"] * gamma
    return folded


class _TorchNonLeafZeros:
    """What PILOT's ``backbone/vit_coda_promtpt.py`` sees as ``torch``: ``torch``, except that
    ``zeros(..., requires_grad=True)`` returns a non-leaf (a clone). Its forward starts the prompt loss as
    ``torch.zeros((1,), requires_grad=True).to(device=x.device)`` and adds to it in place; on a GPU ``.to`` copies
    the leaf, on the CPU it returns the leaf itself and the in-place add fails (``a leaf Variable that requires grad
    is being used in an in-place operation``). The clone is what ``.to`` gives on a GPU; values are unchanged."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = torch.zeros(*args, **kwargs)
        return tensor.clone() if tensor.requires_grad else tensor


def _coda_patches(
    inc_net: Any, state: dict[str, torch.Tensor], img_size: int, architecture: dict[str, Any] | None
) -> list[contextlib.AbstractContextManager[None]]:
    """PILOT's CODA-Prompt, built unchanged but at the harness's ViT: ``get_backbone`` calls
    ``timm.create_model("vit_base_patch16_224_coda_prompt", pretrained=True)``, whose ``_create_vision_transformer``
    (timm-0.6 registry calls) becomes ``vit_coda_promtpt.VisionTransformer(img_size=..., **kwargs)`` (with
    ``architecture``: the config ViT's shape) plus the weights through vit_coda_promtpt's own
    ``checkpoint_filter_fn``. Its Block has no LayerScale: DINOv2's gammas are folded into ``attn.proj`` /
    ``mlp.fc2`` (:func:`fold_layer_scale`); the module sees :class:`_TorchNonLeafZeros` as ``torch`` (its forward
    fails on the CPU otherwise). ``CodaPromptVitNet`` hard-codes width 768 for its head and its ``CodaPrompt``; for
    another width the class that ``models.coda_prompt`` builds is replaced by a subclass that, after its own
    ``__init__``, rebuilds the two (``nn.Linear(D, nb_classes)``, ``CodaPrompt(D, nb_tasks, prompt_param,
    key_dim=D)``) at the ViT's width ``D``."""
    module = importlib.import_module("backbone.vit_coda_promtpt")
    shape = dict(architecture or {})
    shape.pop("init_values", None)  # their Block has no LayerScale: folded into the weights instead
    weights = fold_layer_scale(state)

    def create_coda(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        kwargs = _vit_b16_kwargs(variant, kwargs)
        kwargs.update(shape)
        model = module.VisionTransformer(img_size=img_size, **kwargs)
        if not pretrained:
            return model
        return _load_seeded(model, module.checkpoint_filter_fn(dict(weights), model), ())

    patches: list[contextlib.AbstractContextManager[None]] = [
        _patched(module, "_create_vision_transformer", create_coda),
        _patched(module, "torch", _TorchNonLeafZeros()),
    ]
    width = int(shape.get("embed_dim", CODA_WIDTH))
    if width != CODA_WIDTH:
        base, prompt_cls = inc_net.CodaPromptVitNet, inc_net.CodaPrompt

        class CodaPromptVitNetAtWidth(base):  # type: ignore[misc, valid-type]
            def __init__(self, args: dict[str, Any], pretrained: bool) -> None:
                super().__init__(args, pretrained)
                self.fc = nn.Linear(width, args["nb_classes"])
                self.prompt = prompt_cls(width, args["nb_tasks"], args["prompt_param"], key_dim=width)

        learner_module = importlib.import_module("models.coda_prompt")
        # only where the Learner looks it up: utils.inc_net's own name must stay the class (its __init__ calls
        # super(CodaPromptVitNet, self))
        patches.append(_patched(learner_module, "CodaPromptVitNet", CodaPromptVitNetAtWidth))
    return patches


def _coda_hyperparameters(pilot_args: dict[str, Any], method: cil.CILMethod, epochs: int) -> dict[str, Any]:
    """The json's values next to ``cil``'s (``prompt_param`` = [pool, length, ortho weight])."""
    ours: Any = method
    pool, length, ortho = pilot_args["prompt_param"]
    pairs = {
        "pool_size": (ours.pool_size, int(pool)),
        "length": (ours.length, int(length)),
        "ortho_weight": (float(ours.ortho_weight), float(ortho)),
        "lr": (float(ours.lr), float(pilot_args["init_lr"])),
        "weight_decay": (float(ours.weight_decay), float(pilot_args["weight_decay"])),
        "epochs": (int(ours.epochs), int(pilot_args["tuned_epoch"])),
        "optimizer": ("adam", pilot_args["optimizer"]),
        "scheduler": ("coda_cosine", pilot_args["scheduler"]),
    }
    same = all(a == b for k, (a, b) in pairs.items() if k not in ("scheduler",)) and pairs["scheduler"][1] == "cosine"
    return {**{k: {"cil": a, "pilot": b} for k, (a, b) in pairs.items()}, "equal": bool(same)}


_PILOT_NAMES = {"components": "e_p", "keys": "e_k", "attention": "e_a"}  # CodaPrompt's e_<x>_<block>


def _coda_tensors(prompt: Any, layer: int) -> dict[str, torch.Tensor]:
    """One layer's parameters of PILOT's ``CodaPrompt``, under ``cil``'s ``ComponentPool`` names."""
    return {name: getattr(prompt, f"{short}_{layer}") for name, short in _PILOT_NAMES.items()}


def _coda_transplant(method: cil.CILMethod, network: nn.Module, task: int, known: int, total: int) -> Any:
    """A copy of ``cil``'s CODA-Prompt as it stands in task ``task`` (classes ``known..total-1``, head at ``total``
    rows, as many tasks as PILOT's ``n_tasks``), holding PILOT's current components, keys, attention vectors and head
    rows."""
    ours: Any = copy.deepcopy(method)
    ours.log = lambda *args, **kwargs: None  # training_step outside a Trainer
    prompt: Any = network.prompt
    ours.num_tasks, ours.task_index = int(prompt.n_tasks), task
    ours.seen_classes, ours.new_classes = list(range(total)), list(range(known, total))
    if ours.head.num_classes < total:
        ours.head.expand(total - ours.head.num_classes)
    if list(ours.layers) != list(prompt.e_layers):
        raise ValueError(f"prompted blocks differ: cil {ours.layers}, PILOT {prompt.e_layers}")
    fc: Any = network.fc
    with torch.no_grad():
        for layer, pool in zip(ours.layers, ours.pools, strict=True):
            for name, value in _coda_tensors(prompt, layer).items():
                getattr(pool, name).copy_(value)
        ours.head.weight.copy_(fc.weight[:total])
        ours.head.bias.copy_(fc.bias[:total])
    return ours


class _EinsumRecorder:
    """What PILOT's ``backbone/prompt.py`` sees as ``torch`` during a check: ``torch``, with every result of the
    einsum ``'bkd,kd->bk'`` (CodaPrompt's weights ``alpha = cos(q * A, K)``, one call per prompted block) kept."""

    def __init__(self, kept: list[torch.Tensor]) -> None:
        self.kept = kept

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def einsum(self, equation: str, *operands: Any) -> torch.Tensor:
        result = torch.einsum(equation, *operands)
        if equation == "bkd,kd->bk":
            self.kept.append(result.detach().clone())
        return result


def _coda_allocation(method: cil.CILMethod, prompt: Any, task: Task, seed: int) -> dict[str, Any]:
    """Task ``task``'s Gram-Schmidt allocation, from PILOT's prompt state before it: PILOT's ``gram_schmidt`` (at
    ``task_count + 1``) vs ``cil.layers.gram_schmidt_rows``, each tensor from the same ``torch.manual_seed(seed)``
    (their ``randn_like(column)`` and our ``randn(F)`` draw the same numbers in the same order); then the whole
    procedure from one seed: PILOT's ``process_task_count`` vs ``cil``'s ``before_task``."""
    from cil.layers import gram_schmidt_rows

    theirs: Any = copy.deepcopy(prompt)
    theirs.task_count += 1
    per = int(theirs.e_pool_size / theirs.n_tasks)
    start, stop = theirs.task_count * per, (theirs.task_count + 1) * per
    tensors: dict[str, Any] = {}
    for layer in theirs.e_layers:
        for name, value in _coda_tensors(theirs, layer).items():
            torch.manual_seed(seed)
            a = theirs.gram_schmidt(value.detach().clone()).detach()
            torch.manual_seed(seed)
            b = gram_schmidt_rows(value.detach().flatten(1), start, stop).view_as(value)
            new = b.flatten(1)[start:stop]
            tensors[f"{layer}.{name}"] = {
                "bit_identical": bool(torch.equal(a, b)),
                **_gap(b, a),
                "earlier_rows_kept": bool(torch.equal(b.flatten(1)[:start], value.detach().flatten(1)[:start])),
                "later_rows_zero": bool((b.flatten(1)[stop:] == 0).all()),
                "new_rows_orthonormal_err": float((new @ new.T - torch.eye(len(new))).abs().max()),
            }
    # the whole procedure: same seed once, then each side's own order of draws
    whole_theirs: Any = copy.deepcopy(prompt)
    torch.manual_seed(seed)
    whole_theirs.process_task_count()
    ours: Any = copy.deepcopy(method)
    ours.num_tasks, ours.task_index = int(prompt.n_tasks), task.index
    with torch.no_grad():
        for layer, pool in zip(ours.layers, ours.pools, strict=True):
            for name, value in _coda_tensors(prompt, layer).items():
                getattr(pool, name).copy_(value)
    torch.manual_seed(seed)
    ours.before_task(task)
    whole = {
        f"{layer}.{name}": _gap(getattr(pool, name), value)
        for layer, pool in zip(ours.layers, ours.pools, strict=True)
        for name, value in _coda_tensors(whole_theirs, layer).items()
    }
    return {
        "rows": [start, stop],
        "per_tensor_same_seed": tensors,
        "per_tensor_bit_identical": sum(v["bit_identical"] for v in tensors.values()),
        "per_tensor_max_abs_diff": max(v["max_abs_diff"] for v in tensors.values()),
        "tensors": len(tensors),
        "whole_procedure_max_abs_diff": max(v["max_abs_diff"] for v in whole.values()),
        "whole_procedure_order": {
            "pilot": "per block: keys, attention, components",
            "cil": "per block: components, keys, attention",
        },
    }


def _check_coda_step(
    method: cil.CILMethod, learner: Any, x: torch.Tensor, y: torch.Tensor, task: Task, known: int, seed: int
) -> tuple[dict[str, Any], Any]:
    """One training step of task ``task`` from the same state on the same batch, each side through its own code:
    PILOT's ``Learner._init_train`` (a one-batch loader, one epoch, its ``get_optimizer()``) and ``cil``'s
    ``training_step`` + ``configure_optimizers()``. For a later task, PILOT's ``process_task_count`` first allocates
    the task's components (seeded) and the result is what both sides start from. Compared: the query, per block
    the weights ``alpha`` and the prompt, the logits, the loss, every trained tensor's gradient and the tensors after
    the step. Returns the report and PILOT's learner after the step (the next task's start)."""
    total = known + task.num_classes
    learner = copy.deepcopy(learner)
    net, prompt = learner._network, learner._network.prompt
    learner._cur_task, learner._known_classes, learner._total_classes = task.index, known, total
    allocation = None
    if task.index > 0:
        allocation = _coda_allocation(method, prompt, task, seed)
        torch.manual_seed(seed)
        prompt.process_task_count()
    ours = _coda_transplant(method, net, task.index, known, total)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    recorded: dict[str, Any] = {"q": [], "prompts": [], "alpha": []}
    prompt_forward, net_forward = prompt.forward, net.forward

    def recording_prompt(x_querry: torch.Tensor, layer: int, x_block: torch.Tensor, train: bool = False) -> Any:
        p_return, loss, block = prompt_forward(x_querry, layer, x_block, train=train)
        if p_return is not None:
            recorded["q"].append(x_querry.detach().clone())
            recorded["prompts"].append(torch.cat(p_return, dim=1).detach().clone())  # [B, L, D]: keys, values
        return p_return, loss, block

    def recording_forward(*args: Any, **kwargs: Any) -> Any:
        out = net_forward(*args, **kwargs)
        recorded["out"] = out  # their loop then writes -inf into logits[:, :known], in place
        return out

    prompt.forward, net.forward = recording_prompt, recording_forward
    learner.data_weighting()
    optimizer = learner.get_optimizer()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    theirs_trained = {n for n, p in net.named_parameters() if id(p) in in_optimizer}  # its ViT keeps requires_grad
    frozen_with_grad = sum(1 for n, p in net.named_parameters() if p.requires_grad and n not in theirs_trained)
    learner.args = {**learner.args, "tuned_epoch": 1}
    with _patched(sys.modules["backbone.prompt"], "torch", _EinsumRecorder(recorded["alpha"])):
        learner._init_train([(None, x, y)], None, optimizer, None)
    del prompt.forward, net.forward  # the class's methods again
    logits_out, prompt_loss = recorded["out"]
    theirs_logits = logits_out[:, :total].detach()
    theirs_loss = F.cross_entropy(theirs_logits, y.long()) + prompt_loss.sum()

    ours.train()
    opt = ours.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in opt.param_groups for p in group["params"]}
    ours_trained = {n for n, p in ours.named_parameters() if id(p) in in_optimizer}
    query = ours.query(x)
    start, stop = ours._span()
    with torch.no_grad():
        pooled = [pool(query, start, stop) for pool in ours.pools]  # (prompt [B, L, D], alpha [B, N_used])
    z, _ = ours.prompted(x)
    logits = ours.head(z)
    loss = ours.training_step((x, y), 0)
    opt.zero_grad()
    loss.backward()
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer, pool in zip(ours.layers, ours.pools, strict=True):
        for name, value in _coda_tensors(prompt, layer).items():
            pairs[f"pools.{layer}.{name}"] = (getattr(pool, name), value)
    pairs["head.weight"] = (ours.head.weight, net.fc.weight)
    pairs["head.bias"] = (ours.head.bias, net.fc.bias)

    def rows(theirs: torch.Tensor, n: str) -> torch.Tensor:
        return theirs[:total] if n.startswith("head") else theirs

    grads = {n: _gap(cast(torch.Tensor, a.grad), rows(cast(torch.Tensor, b.grad), n)) for n, (a, b) in pairs.items()}
    opt.step()
    # Adam's first step is -lr g / (|g| + eps): an element whose gradient is near eps moves by up to lr |dg| / eps
    # for a gradient difference dg, so the step's difference is bounded by that, not by fp32 rounding of the step
    lr, eps = float(opt.param_groups[0]["lr"]), float(opt.param_groups[0]["eps"])
    after = {
        n: {**_gap(a, rows(b, n)), "adam_bound": lr * grads[n]["max_abs_diff"] / eps} for n, (a, b) in pairs.items()
    }
    theirs_params = dict(net.named_parameters())
    moved = (theirs_params["fc.weight"].detach() - before["fc.weight"]).abs().amax(dim=1)  # [rows]
    outside = torch.cat([moved[:known], moved[total:]])
    earlier_moved = {"pilot": 0.0, "cil": 0.0}  # earlier tasks' rows: detached on both sides, 0 expected
    for layer, pool in zip(ours.layers, ours.pools, strict=True):
        for name, value in _coda_tensors(prompt, layer).items():
            initial = before[f"prompt.{_PILOT_NAMES[name]}_{layer}"]
            for side, tensor in (("pilot", value), ("cil", getattr(pool, name))):
                change = float((tensor.detach() - initial)[:start].abs().max()) if start else 0.0
                earlier_moved[side] = max(earlier_moved[side], change)
    report = {
        "task": task.index,
        "known": known,
        "total": total,
        "components": [start, stop],
        "batch": len(y),
        "labels": sorted(set(y.tolist())),
        "trained_tensors": {"cil": len(ours_trained), "pilot": len(theirs_trained)},
        "pilot_vit_tensors_with_grad_not_optimised": frozen_with_grad,
        "trained_elements": {
            "cil": sum(dict(ours.named_parameters())[n].numel() for n in ours_trained),
            "pilot": sum(theirs_params[n].numel() for n in theirs_trained),
        },
        "query": _gap(query, recorded["q"][0]),
        "alpha": {
            str(layer): _gap(w, a) for layer, (_, w), a in zip(ours.layers, pooled, recorded["alpha"], strict=True)
        },
        "prompts": {
            str(layer): _gap(p, r) for layer, (p, _), r in zip(ours.layers, pooled, recorded["prompts"], strict=True)
        },
        "logits": _gap(logits[:, known:], theirs_logits[:, known:]),
        "loss": {"cil": float(loss.detach()), "pilot": float(theirs_loss.detach()), **_gap(loss, theirs_loss)},
        "grad": grads,
        "after_step": after,
        "pilot_head_rows_outside_task_moved": float(outside.max()) if len(outside) else 0.0,
        "earlier_components_moved": earlier_moved,
    }
    if allocation is not None:
        report["allocation"] = allocation
    return report, learner


@torch.no_grad()
def _check_coda_backbone(plain: cil.Backbone, network: nn.Module, inputs: torch.Tensor, batch: int) -> dict[str, Any]:
    """CODA-Prompt before training: PILOT's ``vit_coda_promtpt`` ViT holds ``cil``'s weights (LayerScale folded,
    :func:`fold_layer_scale`), and its unprompted final-norm class token, ``backbone(x)[0][:, 0]`` (their query),
    agrees with ``cil``'s ``Backbone`` to fp32 rounding (their attention: ``q @ k.T``, softmax, ``@ v``; timm's:
    SDPA)."""
    # cil's prompted blocks hold their attention in a PrefixSlot (``attn.base.``), which owns no parameters
    ours = fold_layer_scale({k.replace(".attn.base.", ".attn."): v for k, v in plain.model.state_dict().items()})
    vit: Any = network.backbone
    theirs = dict(vit.state_dict())
    with _eval_mode(plain, network):
        mine = torch.cat([plain(x) for x in inputs.split(batch)])
        pilot = torch.cat([vit(x)[0][:, 0] for x in inputs.split(batch)])
    return {
        "state_dict_equal": _same_state(ours, theirs),
        "layer_scale_folded": len(plain.model.state_dict()) - len(ours),
        "tensors_compared": len(ours),
        "images": len(inputs),
        "feature_dim": int(mine.shape[1]),
        **feature_gap(mine, pilot),
    }


@torch.no_grad()
def _check_coda_eval(
    method: cil.CILMethod, network: nn.Module, inputs: torch.Tensor, batch: int, total: int
) -> dict[str, Any]:
    """Evaluation from the same state (task 1): PILOT's ``network(x)[:, :total]`` (eval mode, components ``[0, f)``)
    vs ``cil``'s ``forward``, on ``inputs`` in PILOT's test batches."""
    ours = _coda_transplant(method, network, 0, 0, total)
    with _eval_mode(ours, network):
        mine = torch.cat([ours(x) for x in inputs.split(batch)])
        theirs = torch.cat([network(x)[:, :total] for x in inputs.split(batch)])
    return {
        "images": len(inputs),
        "classes": total,
        "same_predictions": int((mine.argmax(1) == theirs.argmax(1)).sum()),
        **_gap(mine, theirs),
    }


def _coda_schedule(method: cil.CILMethod, learner: Any, epochs: int) -> dict[str, Any]:
    """The learning rate of every epoch of a task: PILOT's ``get_scheduler`` (``CosineSchedule``, stepped once per
    epoch after it, as ``_init_train`` does) vs ``cil``'s ``configure_optimizers`` (``LambdaLR``, Lightning's
    ``interval: epoch``)."""
    sides: dict[str, list[float]] = {}
    learner = copy.deepcopy(learner)
    learner.args = {**learner.args, "tuned_epoch": epochs}
    theirs_opt = learner.get_optimizer()
    theirs_schedule = learner.get_scheduler(theirs_opt)
    ours: Any = copy.deepcopy(method)
    ours.epochs = epochs
    conf = ours.configure_optimizers()
    ours_opt, ours_schedule = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    for side, opt, schedule in (("pilot", theirs_opt, theirs_schedule), ("cil", ours_opt, ours_schedule)):
        lrs = []
        for _ in range(epochs):
            lrs.append(float(opt.param_groups[0]["lr"]))
            opt.step()  # no gradients: nothing moves; keeps torch's step-order warning away
            schedule.step()
        sides[side] = lrs
    gap = max(abs(a - b) for a, b in zip(sides["cil"], sides["pilot"], strict=True))
    return {**sides, "max_abs_diff": gap, "equal": gap <= 1e-12 * max(sides["pilot"])}


def _coda_checks(
    method: cil.CILMethod, learner: Any, dm: Any, stream: cil.Stream, batch: int, seed: int, pilot_args: dict[str, Any]
) -> dict[str, Any]:
    """The CODA-Prompt checks before training: hyper-parameters and the per-epoch learning rate; one training step
    in the first task and in the second (PILOT's task-1 learner after its step, then its seeded allocation of the
    second slice, checked against ``cil``'s, old classes masked, old components detached), each on ``batch``
    training images drawn with ``seed`` (evaluation transform); evaluation over the first task's test images."""
    steps = []
    current = learner
    for task, known, x, y in _step_batches(dm, stream, batch, seed):
        step, current = _check_coda_step(method, current, x, y, task, known, seed)
        steps.append(step)
    first, inputs = _first_task_test(dm, stream)
    evaluation = _check_coda_eval(method, learner._network, inputs, batch, first)
    schedule = _coda_schedule(method, learner, int(pilot_args["tuned_epoch"]))
    hyper = _coda_hyperparameters(pilot_args, method, int(cast(Any, method).epochs))
    per_task = {
        "cil": cast(Any, method).pool_size // len(stream),
        "pilot": int(learner._network.prompt.e_pool_size / learner._network.prompt.n_tasks),
    }

    def step_ok(step: dict[str, Any]) -> bool:
        close = [step["query"], step["logits"], step["loss"], *step["alpha"].values(), *step["prompts"].values()]
        return (
            all(v["max_rel_diff"] < 1e-5 for v in close)
            and all(v["max_rel_diff"] < 1e-4 for v in step["grad"].values())
            and all(
                v["max_rel_diff"] < 1e-4 or v["max_abs_diff"] <= v["adam_bound"] for v in step["after_step"].values()
            )
            and step["trained_tensors"]["cil"] == step["trained_tensors"]["pilot"]
            and step["pilot_head_rows_outside_task_moved"] == 0.0
            and step["earlier_components_moved"]["pilot"] == step["earlier_components_moved"]["cil"] == 0.0
        )

    allocation = steps[1].get("allocation", {}) if len(steps) > 1 else {}
    passed = (
        all(step_ok(s) for s in steps)
        and evaluation["same_predictions"] == evaluation["images"]
        and evaluation["max_rel_diff"] < 1e-5
        and schedule["equal"]
        and hyper["equal"]
        and per_task["cil"] == per_task["pilot"]
        and (not allocation or allocation["per_tensor_max_abs_diff"] < 1e-4)
    )
    return {
        "hyperparameters": hyper,
        "components_per_task": per_task,
        "lr_per_epoch": schedule,
        "steps": steps,
        "eval": evaluation,
        "passed": bool(passed),
    }


# ---- RanPAC and FeCAM: PILOT's ports on frozen features -------------------------------------------------------
def _frozen_port_patches(
    method: str, ridge_calls: list[dict[str, Any]]
) -> list[contextlib.AbstractContextManager[None]]:
    """PILOT's first session is off (``tuned_epoch`` 0): its ``Learner._init_train`` is skipped, because with no
    epoch its loop does not run and its closing ``logging.info(info)`` reads a name only the loop sets. RanPAC's
    ``optimise_ridge_parameter`` is wrapped to record what it is given and what it returns (same return value)."""
    module = importlib.import_module(f"models.{method}")
    patches: list[contextlib.AbstractContextManager[None]] = [
        _patched(module.Learner, "_init_train", lambda self, *args: None)
    ]
    if method == "ranpac":
        choose = module.Learner.optimise_ridge_parameter

        def recorded(self: Any, features: torch.Tensor, targets: torch.Tensor) -> Any:
            ridge = choose(self, features, targets)
            ridge_calls.append({"features": features.clone(), "targets": targets.clone(), "ridge": float(ridge)})
            return ridge

        patches.append(_patched(module.Learner, "optimise_ridge_parameter", recorded))
    return patches


def _ranpac_shared_draws(
    method: cil.CILMethod, learner: Any, ridge_calls: list[dict[str, Any]]
) -> list[contextlib.AbstractContextManager[None]]:
    """The two random choices of RanPAC, made once: ``cil`` takes PILOT's projection ``W_rand`` (drawn with
    ``torch.randn`` in its ``setup_RP``) and, task by task, the lambda PILOT chose (its split is the order of a
    shuffled DataLoader, ours a seeded permutation). That PILOT's choice is what ``cil.ridge.select_ridge`` makes on
    the same features is checked separately (:func:`_ranpac_comparison`)."""
    head = cast(Any, method).head
    ranpac_module = importlib.import_module("methods.ranpac")
    lambdas = iter([call["ridge"] for call in ridge_calls])
    theirs = learner.W_rand.detach().cpu()

    def draw(generator: torch.Generator | None = None) -> None:
        head.projection.copy_(theirs)

    return [
        _patched(head, "draw", draw),
        _patched(ranpac_module, "select_ridge", lambda *args, **kwargs: next(lambdas)),
    ]


@torch.no_grad()
def _ranpac_comparison(method: cil.CILMethod, learner: Any, ridge_calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task, lambda as ``cil.ridge.select_ridge`` chooses it on PILOT's own features and order vs PILOT's choice;
    after the stream, the readouts (their ``fc.weight`` rows of the seen classes vs ours) and ``G``."""
    from cil.ridge import select_ridge
    from methods.ranpac import RIDGES

    head = cast(Any, method).head
    lambdas = [
        {"pilot": call["ridge"], "cil_on_pilot_features": select_ridge(call["features"], call["targets"], RIDGES)}
        for call in ridge_calls
    ]
    theirs = learner._network.fc.weight.detach().cpu().double()[: head.num_classes]  # [C, M]
    ours = head.readout.double()
    return {
        "lambdas": lambdas,
        "lambdas_equal": all(row["pilot"] == row["cil_on_pilot_features"] for row in lambdas),
        "readout": _gap(ours, theirs),
        "gram": _gap(head.gram.double(), learner.G.double()),
    }


@torch.no_grad()
def _fecam_comparison(method: cil.CILMethod, learner: Any, images: torch.Tensor, batch: int) -> dict[str, Any]:
    """Class means (theirs: ``fc.weight`` rows, raw; ours normalised for the distance), inverse covariances (theirs:
    ``pinv`` of ``cov_mats``, float32, at every evaluation; ours stored, from float64) and the distances of the test
    ``images`` to every class after the stream (their ``_maha_dist`` vs minus our logits). PILOT's row correlation
    matrix is singular along the all-ones direction, where the two pseudo-inverses differ by rounding; what the
    distances make of that is the last entry."""
    head = cast(Any, method).head
    theirs_means = F.normalize(learner._network.fc.weight.detach().cpu().double()[: head.num_classes], dim=-1)
    theirs_precisions = torch.stack([torch.linalg.pinv(c.double()) for c in learner.cov_mats])
    with cast(Any, method).evaluating():
        z = torch.cat([method.embed(x) for x in images.split(batch)])  # [N, D]
        ours = -method.classify(z).double()  # [N, C]
    theirs = torch.as_tensor(learner._maha_dist(z.numpy(), learner._network.fc.weight.data, learner.cov_mats)).T
    return {
        "means": _gap(head.means.double(), theirs_means),
        "precisions": _gap(head.precisions.double(), theirs_precisions),
        "distances": _gap(ours, theirs.double()),
        "nearest_class_equal": int((ours.argmin(1) == theirs.argmin(1)).sum()),
        "images": len(z),
    }


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
        "--accept-prompt-ties",
        action="store_true",
        help="L2P, batch-wise: train even where a check batch's chosen prompts differ only among prompts with equal "
        "votes (tie-breaking; recorded in report.json)",
    )
    parser.add_argument(
        "--config-backbone",
        "--l2p-config-backbone",
        dest="config_backbone",
        action="store_true",
        help="L2P / CODA-Prompt: keep the cil config's backbone (e.g. the offline DINOv2 ViT-S/14 at 112 px) on both "
        "sides, PILOT's vit_l2p / vit_coda_promtpt rebuilt in its shape and given its weights, instead of the seeded "
        "ViT-B/16 (--l2p-config-backbone: the earlier name)",
    )
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
    if options.method in FROZEN_PORTS:
        if options.epochs:
            raise ValueError(
                f"{options.method} is compared on frozen features: leave --epochs out (APER's runs compare adaptation)"
            )
        init_args.update(FROZEN_PORTS[options.method])
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
    if options.config_backbone and options.method not in CONFIG_BACKBONE_METHODS:
        raise ValueError(f"--config-backbone is for --method {' / '.join(CONFIG_BACKBONE_METHODS)}")
    if options.config_backbone:
        data["eval_batch_size"] = int(data["batch_size"])  # PILOT's L2P / CODA-Prompt test loader
    elif spec.seeded_vit:
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
    architecture: dict[str, Any] | None = None
    img_size = options.img_size
    if options.config_backbone:
        state = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
        architecture, img_size = _vit_architecture(backbone.model), backbone.input_size
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
    if options.method == "l2p":  # one switch for both sides: the json's true, or cil's per-image default
        args["batchwise_prompt"] = bool(init_args.get("batchwise_selection", False))
    if options.method in FROZEN_PORTS:
        args["tuned_epoch"] = 0
    if options.method == "ranpac":
        args["M"] = int(init_args.get("projection_dim", 10_000))
    ridge_calls: list[dict[str, Any]] = []
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
    if options.method in FROZEN_PORTS:
        patches += _frozen_port_patches(options.method, ridge_calls)
    if spec.seeded_vit:
        patches += _pilot_vit_patches(spec.pilot_backbone, pilot["utils.inc_net"], state, img_size, architecture)
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
        l2p_learner: Any = None
        if options.method == "mos":
            network = pilot["utils.inc_net"].MOSNet({**check_args, "nb_classes": dm.nb_classes}, True)
            backbone_check = _check_vit_mos_backbone(plain_backbone, backbone, network.backbone, tensors, eval_batch)
        elif options.method == "l2p":
            l2p_learner = original_get_model("l2p", {**check_args, "nb_classes": dm.nb_classes})
            network = l2p_learner._network
            backbone_check = _check_l2p_backbone(backbone, method, network, tensors, eval_batch)
            backbone_check["l2p"] = _l2p_checks(
                method,
                l2p_learner,
                dm,
                stream,
                int(data["batch_size"]),
                options.seed,
                bool(args["batchwise_prompt"]),
                options.accept_prompt_ties,
            )
        elif options.method == "coda_prompt":
            coda_args = {**check_args, "nb_classes": dm.nb_classes, "nb_tasks": dm.nb_tasks}  # what trainer adds
            coda_learner = original_get_model("coda_prompt", coda_args)
            network = coda_learner._network
            backbone_check = _check_coda_backbone(backbone, network, tensors, eval_batch)
            backbone_check["coda"] = _coda_checks(
                method, coda_learner, dm, stream, int(data["batch_size"]), options.seed, coda_args
            )
            del coda_learner
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
        if "l2p" in bb:
            features_ok &= bb["l2p"]["passed"]
        if "coda" in bb:
            features_ok &= bb["coda"]["passed"]
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
        l2p_learner = None

        # PILOT's own driver
        started, cpu = time.perf_counter(), _cpu_seconds()
        with _cwd(out / "pilot"):
            pilot["trainer"]._train(dict(args))
        pilot_wall, pilot_cpu = time.perf_counter() - started, _cpu_seconds() - cpu

    started, cpu = time.perf_counter(), _cpu_seconds()
    if spec.aper:
        tuned_inits["cil"] = copy.deepcopy(cast(nn.Module, method.adapted))
    ours_patches = _ranpac_shared_draws(method, learners[0], ridge_calls) if options.method == "ranpac" else []
    with _recording_engine() as calls, contextlib.ExitStack() as stack:
        for patch in ours_patches:
            stack.enter_context(patch)
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
    if options.method == "ranpac":
        report["ranpac"] = _ranpac_comparison(method, learners[0], ridge_calls)
    if options.method == "fecam":
        report["fecam"] = _fecam_comparison(method, learners[0], test_tensors, eval_batch)
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
