"""Paper presets hold the authors' numbers: each value below was read in the authors' released code (the file:line in
the last column, at the commit the preset names), and every preset says in a comment where its values come from.

Pure YAML parsing; nothing is built or trained. When a preset changes on purpose, change its row here and say in
the preset's comment which file and line the new value comes from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
PRESETS = sorted(PAPER.glob("*.yaml"))

# Where the numbers were read (repository@commit as named in the presets' comments).
RCIL = "RevisitingCIL@a2e6b71"
PILOT = "LAMDA-PILOT@5240714"
MOS = "AAAI25-MOS@8d5e07c"
LAE = "gqk/LAE@1680e49"
CODYRA = "CoDyRA@c1691e4"
ZSCL = "Thunderbeee/ZSCL@b96e714"
JAX_L2P = "google-research/l2p@dd8836e"
CODA = "GT-RIPL/CODA-Prompt@6417d4f"
RANPAC = "RanPAC/RanPAC@012927f"
FECAM = "dipamgoswami/FeCAM@d2479b7"
SLCA = "GengDavid/SLCA@169d4e6"
EASE = "sun-hailong/CVPR24-Ease@6d67508"

Row = tuple[str, str, Any, str]


def _aper(
    variant: str, json_path: str, epochs: int, lr: float, batch: int, model_file: str, sgd_line: int
) -> list[Row]:
    """The rows every APER CIFAR-100 preset shares (RevisitingCIL's IN-21k json, which their ViT branch reads)."""
    preset = f"aper_{variant}_cifar100_b0inc10.yaml"
    json = RCIL + f" exps/{json_path}:"
    return [
        (preset, "method.init_args.epochs", epochs, json + ("21" if variant == "finetune" else "23")),
        (preset, "method.init_args.lr", lr, json + ("22" if variant == "finetune" else "24")),
        (preset, "method.init_args.weight_decay", 0.0005, json + "12"),
        (preset, "method.init_args.momentum", 0.9, f"{RCIL} models/{model_file}:{sgd_line}"),
        (preset, "data.batch_size", batch, json + ("23" if variant == "finetune" else "25")),
        (preset, "seed_everything", 1993, json + ("18-19" if variant == "finetune" else "20-21")),
        (preset, "backbone.name", "vit_base_patch16_224.augreg_in21k", json + "11"),
    ]


def _mos(preset: str, json: str, epochs: int, lr: float, batch: int, wd: float, cov: str, increment: int) -> list[Row]:
    """The rows every MOS preset has (exps/mos_*_in21k.json; models/mos.py reads it, no module-level override)."""
    src = f"{MOS} exps/{json}:"
    code = f"{MOS} models/mos.py:"
    return [
        (preset, "method.init_args.epochs", epochs, src + "15"),
        (preset, "method.init_args.lr", lr, src + "16"),
        (preset, "data.batch_size", batch, src + "17"),
        (preset, "method.init_args.weight_decay", wd, src + "18"),
        (preset, "method.init_args.covariance", cov, src + "31"),
        (preset, "method.init_args.bottleneck", 16, src + "38"),
        (preset, "method.init_args.orth_weight", 0.1, src + "25"),
        (preset, "method.init_args.merge_momentum", 1 - 0.9**13, src + "26 (0.1, applied 13 times per step)"),
        (preset, "method.init_args.align_epochs", 30, src + "29"),
        (preset, "method.init_args.align_lr", 0.005, src + "30"),
        (preset, "method.init_args.ensemble", True, src + "27"),
        (preset, "method.init_args.head_lr_scale", 0.1, code + "122"),
        (preset, "method.init_args.momentum", 0.9, code + "128"),
        (preset, "method.init_args.align_samples_per_class", 5 * batch, code + "261"),
        (preset, "method.init_args.max_refine", 4, code + "379"),
        (preset, "data.eval_batch_size", 3 * batch, code + "209"),
        (preset, "stream.increment", increment, src + "8-9"),
        (preset, "seed_everything", 1993, src + "13"),
    ]


_LAE_PET_ROWS: dict[str, Any] = {  # how their PET modules are built, beyond the size
    "adapter": lambda preset, config: [
        (preset, "method.init_args.pet_options.activation", "gelu", f"{LAE} libml/model/pet/adapter.py:19"),
        (preset, "method.init_args.pet_options.learn_scale", True, config + "11 (scale: null)"),
    ],
    "lora": lambda preset, config: [
        (preset, "method.init_args.pet_options.learn_scale", True, config + "10 (scale: null)"),
    ],
    "prefix": lambda preset, config: [
        (preset, "method.init_args.pet_options.learn_scale", True, config + "10-11 (key_scale, val_scale: null)"),
        (preset, "method.init_args.pet_options.compensate", True, config + "12"),
        (preset, "method.init_args.pet_options.init_bounds", [0.0, 0.01], f"{LAE} libml/model/pet/prompt.py:30"),
    ],
}


def _lae(pet: str, data: str, epochs: int, freeze: int, lr: float, pet_key: str, pet_value: int) -> list[Row]:
    """The rows every LAE preset has (config/base/<data>_order1.yaml extended into config/vit_<pet>.yaml)."""
    preset = f"lae_{pet}_{data}.yaml"
    base = f"{LAE} config/base/{'cifar100' if data.startswith('cifar') else 'imagenet-r'}_order1.yaml:"
    pet_config = f"{LAE} config/vit_{pet}.yaml:"
    classes, increment = (100, 10) if data.startswith("cifar") else (200, 20)
    return [
        (preset, "method.init_args.epochs", epochs, base + "33"),
        (preset, "method.init_args.freeze_epochs", freeze, base + "52"),
        (preset, "method.init_args.lr", lr, base + "36"),
        (preset, "method.init_args.weight_decay", 0.0, base + "37"),
        (preset, "method.init_args.ema_decay", 0.9999, base + "51"),
        (preset, "method.init_args.inference", "ensemble", base + "53"),
        (preset, "method.init_args.blocks", [0, 1, 2, 3, 4], pet_config + "6"),
        (preset, f"method.init_args.pet_options.{pet_key}", pet_value, pet_config + "9"),
        *_LAE_PET_ROWS[pet](preset, pet_config),
        (preset, "data.batch_size", 24, base + "23"),
        (preset, "stream.increment", increment, base + "15"),
        (preset, "stream.order", list(range(classes)), base + "16 (class_order null)"),
        (preset, "seed_everything", 1, base + "1"),
        (preset, "backbone.name", "vit_base_patch16_224.orig_in21k", pet_config + "5"),
    ]


AUTHORS_XTAIL: list[Row] = [
    # CoDyRA: the authors' script is X-TAIL (10 datasets, 16 shots), runner_codyra.sh over main.py's defaults.
    ("codyra_xtail.yaml", "method.init_args.rank", 16, CODYRA + " runner_codyra.sh:9"),
    ("codyra_xtail.yaml", "method.init_args.towers", ["visual", "text"], CODYRA + " runner_codyra.sh:10"),
    (
        "codyra_xtail.yaml",
        "method.init_args.targets",
        ["q", "k", "v", "proj", "fc1", "fc2"],
        CODYRA + " runner_codyra.sh:11",
    ),
    ("codyra_xtail.yaml", "method.init_args.lr", 0.0005, CODYRA + " runner_codyra.sh:13"),
    ("codyra_xtail.yaml", "method.init_args.steps", 500, CODYRA + " runner_codyra.sh:14"),
    ("codyra_xtail.yaml", "method.init_args.kappa_max", 0.005, CODYRA + " runner_codyra.sh:15"),
    ("codyra_xtail.yaml", "method.init_args.dense_fraction", 0.5, CODYRA + " runner_codyra.sh:16"),
    ("codyra_xtail.yaml", "method.init_args.threshold_levels", 50, CODYRA + " main.py:65"),
    ("codyra_xtail.yaml", "method.init_args.weight_decay", 0.0, CODYRA + " main.py:47"),
    ("codyra_xtail.yaml", "data.batch_size", 64, CODYRA + " main.py:43"),
    ("codyra_xtail.yaml", "stream.train_per_class", 16, CODYRA + " main.py:39"),
    ("codyra_xtail.yaml", "seed_everything", 8, CODYRA + " main.py:35"),
    ("codyra_xtail.yaml", "backbone.name", "open_clip/ViT-B-16", CODYRA + " main.py:58-59"),
    ("codyra_xtail.yaml", "protocol", "class_incremental", CODYRA + " main.py evaluation() (all datasets' classes)"),
    ("codyra_xtail.yaml", "label_space", "stream", CODYRA + " main.py:196-206, 248 (every dataset's class names)"),
    ("codyra_xtail.yaml", "evaluate_future", True, CODYRA + " main.py:219 (every dataset after every task)"),
]


def _l2p(dataset: str, json_file: str, epochs: int, batch: int, increment: int) -> list[Row]:
    """The rows of an L2P preset (LAMDA-PILOT's exps/l2p*.json, read by models/l2p.py)."""
    preset, json = f"l2p_{dataset}.yaml", PILOT + f" exps/{json_file}:"
    return [
        (preset, "method.init_args.epochs", epochs, json + "16"),
        (preset, "method.init_args.lr", 0.001875, json + "17"),
        (preset, "data.batch_size", batch, json + "18"),
        (preset, "method.init_args.weight_decay", 0.0, json + "19"),
        (preset, "method.init_args.pool_size", 10, json + "33-47"),
        (preset, "method.init_args.length", 5, json + "33-47"),
        (preset, "method.init_args.top_k", 5, json + "33-47"),
        (preset, "method.init_args.pull_weight", 0.1, json + "33-47"),
        (preset, "stream.increment", increment, json + "8-9"),
        (preset, "seed_everything", 1993, json + "14"),
        (preset, "backbone.name", "vit_base_patch16_224.augreg_in21k_ft_in1k", PILOT + " backbone/vit_l2p.py:89-91"),
        (preset, "backbone.mean", [0.0, 0.0, 0.0], PILOT + " utils/data.py:95-119 (no Normalize)"),
        (preset, "backbone.std", [1.0, 1.0, 1.0], PILOT + " utils/data.py:95-119 (no Normalize)"),
    ]


def _dualprompt(dataset: str, config: str, epochs: int, lr: float, e_length: int, increment: int) -> list[Row]:
    """The rows of a DualPrompt preset (the authors' JAX config; lr = learning_rate x 24 / 256 on one device)."""
    preset, src = f"dualprompt_{dataset}.yaml", JAX_L2P + f" configs/{config}:"
    return [
        (preset, "method.init_args.epochs", epochs, src + "45"),
        (preset, "method.init_args.lr", lr, src + "38 (x 24 / 256, train_continual.py:639)"),
        (preset, "data.batch_size", 24, src + "25"),
        (preset, "method.init_args.weight_decay", 0.0, src + "44"),
        (preset, "method.init_args.gradient_clip", 1.0, src + "41"),
        (preset, "method.init_args.g_length", 5, src + "91"),
        (preset, "method.init_args.g_layers", [0, 1], src + "92"),
        (preset, "method.init_args.e_length", e_length, src + "104"),
        (preset, "method.init_args.e_layers", [2, 3, 4], src + "97"),
        (preset, "method.init_args.pool_size", 10, src + "103"),
        (preset, "method.init_args.top_k", 1, src + "105"),
        (preset, "method.init_args.pull_weight", 1.0, src + "126"),
        (preset, "method.init_args.copy_previous_prompt", True, src + "111"),
        (preset, "stream.increment", increment, src + "67"),
        (preset, "backbone.name", "vit_base_patch16_224.orig_in21k", JAX_L2P + " README.md:51"),
        (preset, "backbone.mean", [0.0, 0.0, 0.0], src + "79 (norm_01)"),
        (preset, "backbone.std", [1.0, 1.0, 1.0], src + "79 (norm_01)"),
    ]


def _coda(dataset: str, config: str, script: str, epochs: int, increment: int) -> list[Row]:
    """The rows of a CODA-Prompt preset (configs/*_prompt.yaml and the experiments script's --prompt_param)."""
    preset, src = f"coda_prompt_{dataset}.yaml", CODA + f" configs/{config}:"
    return [
        (preset, "method.init_args.epochs", epochs, src + "4-5"),
        (preset, "method.init_args.lr", 0.001, src + "9"),
        (preset, "data.batch_size", 128, src + "7"),
        (preset, "method.init_args.weight_decay", 0.0, src + "11"),
        (preset, "method.init_args.pool_size", 100, CODA + f" experiments/{script}"),
        (preset, "method.init_args.length", 8, CODA + f" experiments/{script}"),
        (preset, "method.init_args.ortho_weight", 0.0, CODA + f" experiments/{script}"),
        (preset, "method.init_args.layers", [0, 1, 2, 3, 4], CODA + " models/zoo.py CodaPrompt e_layers"),
        (preset, "stream.increment", increment, src + "2-3"),
        (preset, "stream.seed", None, CODA + " trainer.py:61 (no shuffle at seed 0)"),
        (preset, "backbone.name", "vit_base_patch16_224.augreg_in21k_ft_in1k", CODA + " models/zoo.py:369"),
        (preset, "backbone.mean", [0.0, 0.0, 0.0], CODA + " dataloaders/utils.py (Normalize(0, 1))"),
    ]


def _ranpac(dataset: str, csv: str, adapt: str, backbone: str) -> list[Row]:
    """The rows of a RanPAC preset: the "Algorithm 1" row (ID 7, line 9) of the authors' args/*_publish.csv."""
    preset, row = f"ranpac_{dataset}.yaml", f"{RANPAC} args/{csv}:9"
    return [
        (preset, "method.init_args.adapt", adapt, row),
        (preset, "method.init_args.epochs", 20, row),
        (preset, "method.init_args.lr", 0.01, row),
        (preset, "method.init_args.weight_decay", 0.0005, row),
        (preset, "method.init_args.momentum", 0.9, RANPAC + " RanPAC.py:231"),
        (preset, "method.init_args.projection_dim", 10000, row),
        (preset, "data.batch_size", 48, row),
        (preset, "data.eval_batch_size", 48, RANPAC + " RanPAC.py:170"),
        (preset, "seed_everything", 1993, row),
        (preset, "backbone.name", backbone, row),
        (preset, "backbone.mean", [0.0, 0.0, 0.0], row + " (use_input_norm False)"),
        (preset, "backbone.std", [1.0, 1.0, 1.0], row + " (use_input_norm False)"),
    ]


def _fecam(
    dataset: str, script: str, shrink_lines: str, shrink: float, off_diagonal: float, increment: int
) -> list[Row]:
    """The rows of a FeCAM preset: the authors' script for a pre-trained ViT."""
    preset, src = f"fecam_{dataset}.yaml", f"{FECAM} {script}:"
    return [
        (preset, "method.init_args.adapt", "none", src + " (no optimiser)"),
        (preset, "method.init_args.features", "normalize", src + " F.normalize before np.cov"),
        (preset, "method.init_args.shrink", shrink, src + shrink_lines),
        (preset, "method.init_args.shrink_off_diagonal", off_diagonal, src + shrink_lines),
        (preset, "method.init_args.shrink_relative", True, src + shrink_lines),
        (preset, "method.init_args.covariance_normalization", "correlation", src + " normalize_cov"),
        (preset, "backbone.name", "vit_base_patch16_224.augreg_in21k", src + " timm vit_base_patch16_224_in21k"),
        (preset, "backbone.mean", [0.0, 0.0, 0.0], src + " (ToTensor, no Normalize)"),
        (preset, "stream.increment", increment, src + " num_cls"),
    ]


def _slca(dataset: str, json: str, epochs: int, milestone: int, mean: list[float], data_line: int) -> list[Row]:
    """The rows of an SLCA preset: the json, and models/slca.py's module constants it does not override."""
    preset, src, code = f"slca_{dataset}.yaml", f"{SLCA} exps/slca/{json}:", f"{SLCA} models/slca.py:"
    return [
        (preset, "method.init_args.epochs", epochs, src + "15"),
        (preset, "method.init_args.milestones", [milestone], src + "18"),
        (preset, "method.init_args.align_epochs", 5, src + "16"),
        (preset, "method.init_args.logit_norm", 0.1, src + "17"),
        (preset, "method.init_args.lr", 0.01, code + "18"),
        (preset, "method.init_args.lr_decay", 0.1, code + "20"),
        (preset, "data.batch_size", 128, code + "21"),
        (preset, "method.init_args.weight_decay", 0.0005, code + "24"),
        (preset, "method.init_args.backbone_lr_scale", 0.01, code + "48"),
        (preset, "method.init_args.momentum", 0.9, code + "165"),
        (preset, "method.init_args.align_samples_per_class", 256, code + "197"),
        (preset, "method.init_args.final_norm", "reset", f"{SLCA} convs/vits.py:709-711"),
        (preset, "backbone.name", "vit_base_patch16_224.augreg_in21k", f"{SLCA} utils/inc_net.py:25-26"),
        (preset, "backbone.mean", mean, f"{SLCA} utils/data.py:{data_line}"),
        (preset, "seed_everything", 1993, src + "14"),
    ]


def _ease(dataset: str, json: str, lr: float, batch: int, wd: float, increment: int) -> list[Row]:
    """The rows of an EASE preset (exps/ease_*.json, read by models/ease.py)."""
    preset, src = f"ease_{dataset}.yaml", f"{EASE} exps/{json}:"
    return [
        (preset, "method.init_args.epochs", 20, src + "15,17"),
        (preset, "method.init_args.lr", lr, src + "16,18"),
        (preset, "data.batch_size", batch, src + "19"),
        (preset, "method.init_args.weight_decay", wd, src + "20"),
        (preset, "method.init_args.bottleneck", 64, src + "27"),
        (preset, "method.init_args.alpha", 0.1, src + "30"),
        (preset, "method.init_args.momentum", 0.9, f"{EASE} models/ease.py:276"),
        (preset, "stream.increment", increment, src + "8-9"),
        (preset, "seed_everything", 1993, src + "13"),
        (preset, "backbone.name", "vit_base_patch16_224.augreg_in21k_ft_in1k", f"{EASE} backbone/vit_ease.py:416"),
        (preset, "backbone.mean", [0.0, 0.0, 0.0], f"{EASE} utils/data.py build_transform (no Normalize)"),
    ]


# (preset file, dotted key, the authors' value, where it was read)
AUTHORS: list[Row] = [
    *_ease("cifar100_b0inc5", "ease_cifar.json", 0.025, 48, 0.0005, 5),
    *_ease("imagenet_r_b0inc20", "ease_inr.json", 0.05, 16, 0.005, 20),
    *_slca("cifar100_b0inc10", "slca_cifar.json", 20, 18, [0.5071, 0.4867, 0.4408], 45),
    *_slca("imagenet_r_b0inc20", "slca_imgnetr.json", 50, 40, [0.485, 0.456, 0.406], 136),
    *_ranpac("cifar100_b0inc10", "cifar224_publish.csv", "adapter", "vit_base_patch16_224.augreg_in21k"),
    ("ranpac_cifar100_b0inc10.yaml", "method.init_args.peft_options.bottleneck", 64, RANPAC + " inc_net.py:117"),
    *_ranpac("imagenet_r_b0inc20", "imagenetr_publish.csv", "ssf", "vit_base_patch16_224.augreg_in21k_ft_in1k"),
    *_fecam("cifar100_b0inc10", "FeCAM_vit_cifar100.py", "36-38", 1.0, 0.0, 10),
    ("fecam_cifar100_b0inc10.yaml", "stream.seed", None, FECAM + " FeCAM_vit_cifar100.py:13 (np.arange(100))"),
    *_fecam("imagenet_r_b0inc20", "FeCAM_vit_imagenet-r.py", "45-47", 10.0, 10.0, 20),
    *_l2p("cifar100_b0inc10", "l2p.json", 5, 16, 10),
    *_l2p("imagenet_r_b0inc20", "l2p_inr.json", 10, 32, 20),
    *_dualprompt("cifar100_b0inc10", "cifar100_dualprompt.py", 5, 0.0028125, 5, 10),
    *_dualprompt("imagenet_r_b0inc20", "imr_dualprompt.py", 50, 0.00046875, 20, 20),
    *_coda("cifar100_b0inc10", "cifar-100_prompt.yaml", "cifar-100.sh:29", 20, 10),
    *_coda("imagenet_r_b0inc20", "imnet-r_prompt.yaml", "imagenet-r.sh:28", 50, 20),
    *AUTHORS_XTAIL,
    *_aper("adapter", "aper_adapter/cifar224_5_5_vit-b_adapter.json", 20, 0.01, 48, "aper_adapter.py", 108),
    (
        "aper_adapter_cifar100_b0inc10.yaml",
        "method.init_args.peft_options.bottleneck",
        64,
        RCIL + " exps/aper_adapter/cifar224_5_5_vit-b_adapter.json:14",
    ),
    *_aper("finetune", "aper_finetune/cifar224_5_5_vit-b_finetune.json", 5, 0.01, 128, "aper_finetune.py", 92),
    *_aper("ssf", "aper_ssf/cifar224_5_5_vit-b_ssf.json", 20, 0.01, 48, "aper_ssf.py", 123),
    *_aper("vpt_deep", "aper_vpt-deep/cifar224_5_5_vit-b_vpt-deep.json", 5, 0.05, 16, "aper_vpt.py", 114),
    (
        "aper_vpt_deep_cifar100_b0inc10.yaml",
        "method.init_args.peft_options.num_tokens",
        5,
        RCIL + " exps/aper_vpt-deep/cifar224_5_5_vit-b_vpt-deep.json:14",
    ),
    *_aper("vpt_shallow", "aper_vpt-shallow/cifar224_5_5_vit-b_vpt-shallow.json", 20, 0.01, 48, "aper_vpt.py", 114),
    (
        "aper_vpt_shallow_cifar100_b0inc10.yaml",
        "method.init_args.peft_options.num_tokens",
        5,
        RCIL + " exps/aper_vpt-shallow/cifar224_5_5_vit-b_vpt-shallow.json:14",
    ),
    (
        "aper_adapter_imagenet_r_b0inc5.yaml",
        "method.init_args.epochs",
        20,
        RCIL + " exps/aper_adapter/imagenetr_5_5_vit-b_adapter.json:23",
    ),
    (
        "aper_adapter_imagenet_r_b0inc5.yaml",
        "method.init_args.lr",
        0.05,
        RCIL + " exps/aper_adapter/imagenetr_5_5_vit-b_adapter.json:24",
    ),
    (
        "aper_adapter_imagenet_r_b0inc5.yaml",
        "method.init_args.weight_decay",
        0.005,
        RCIL + " exps/aper_adapter/imagenetr_5_5_vit-b_adapter.json:12",
    ),
    ("aper_adapter_imagenet_r_b0inc5.yaml", "method.init_args.momentum", 0.9, RCIL + " models/aper_adapter.py:108"),
    (
        "aper_adapter_imagenet_r_b0inc5.yaml",
        "method.init_args.peft_options.bottleneck",
        64,
        RCIL + " exps/aper_adapter/imagenetr_5_5_vit-b_adapter.json:14",
    ),
    (
        "aper_adapter_imagenet_r_b0inc5.yaml",
        "data.batch_size",
        24,
        RCIL + " exps/aper_adapter/imagenetr_5_5_vit-b_adapter.json:25",
    ),
    (
        "aper_adapter_imagenet_r_b0inc5.yaml",
        "stream.increment",
        5,
        RCIL + " exps/aper_adapter/imagenetr_5_5_vit-b_adapter.json:8-9",
    ),
    (
        "aper_adapter_imagenet_r_b0inc5.yaml",
        "seed_everything",
        1993,
        RCIL + " exps/aper_adapter/imagenetr_5_5_vit-b_adapter.json:20-21",
    ),
    *_mos("mos_cifar100_b0inc5.yaml", "mos_cifar_in21k.json", 20, 0.03, 48, 0.0005, "full", 5),
    *_mos("mos_cub_b0inc10.yaml", "mos_cub_in21k.json", 10, 0.01, 32, 0.0005, "full", 10),
    *_mos("mos_imagenet_a_b0inc20.yaml", "mos_ina_in21k.json", 10, 0.05, 32, 0.005, "diagonal", 20),
    *_mos("mos_imagenet_r_b0inc20.yaml", "mos_inr_in21k.json", 10, 0.05, 16, 0.005, "full", 20),
    *_mos("mos_objectnet_b0inc20.yaml", "mos_obj_in21k.json", 10, 0.05, 48, 0.005, "full", 20),
    # OmniBenchmark: the json says 20 / 20 (lines 8-9), but the authors' log ran (and reports) 30 / 30.
    *[
        row
        for row in _mos("mos_omnibenchmark_b0inc30.yaml", "mos_omni_in21k.json", 10, 0.01, 16, 0.0005, "full", 30)
        if row[1] != "stream.increment"
    ],
    (
        "mos_omnibenchmark_b0inc30.yaml",
        "stream.increment",
        30,
        MOS + " logs/mos/omnibenchmark/0/20/ _1993_vit_base_patch16_224_in21k_mos.log:4-5",
    ),
    *_mos("mos_vtab_b0inc10.yaml", "mos_vtab_in21k.json", 20, 0.03, 32, 0.005, "full", 10),
    ("mos_vtab_b0inc10.yaml", "stream.order", list(range(50)), MOS + " exps/mos_vtab_in21k.json:7 (shuffle false)"),
    *_lae("adapter", "cifar100_b0inc10", 5, 3, 0.0028125, "bottleneck", 5),
    *_lae("adapter", "imagenet_r_b0inc20", 50, 30, 0.00046875, "bottleneck", 5),
    *_lae("lora", "cifar100_b0inc10", 5, 3, 0.0028125, "rank", 5),
    *_lae("lora", "imagenet_r_b0inc20", 50, 30, 0.00046875, "rank", 5),
    *_lae("prefix", "cifar100_b0inc10", 5, 3, 0.0028125, "length", 10),
    *_lae("prefix", "imagenet_r_b0inc20", 50, 30, 0.00046875, "length", 10),
    # SimpleCIL trains nothing: the class order, and the loader batch that models/simplecil.py's module-level
    # `batch_size = 128` forces over the json's value.
    ("simplecil_cifar100_b0inc10.yaml", "stream.increment", 10, PILOT + " exps/simplecil.json:8-9"),
    ("simplecil_cifar100_b0inc10.yaml", "seed_everything", 1993, PILOT + " exps/simplecil.json:13"),
    ("simplecil_cifar100_b0inc10.yaml", "data.eval_batch_size", 128, PILOT + " models/simplecil.py:16"),
    (
        "simplecil_cifar100_b0inc5.yaml",
        "stream.increment",
        5,
        RCIL + " exps/simplecil/cifar224_5_5_vit-b_simplecil.json:8-9",
    ),
    (
        "simplecil_cifar100_b0inc5.yaml",
        "seed_everything",
        1993,
        RCIL + " exps/simplecil/cifar224_5_5_vit-b_simplecil.json:20-21",
    ),
    ("simplecil_cifar100_b0inc5.yaml", "data.eval_batch_size", 128, RCIL + " models/simplecil.py:16"),
    ("simplecil_imagenet_r_b0inc20.yaml", "stream.increment", 20, PILOT + " exps/simplecil_inr.json:8-9"),
    ("simplecil_imagenet_r_b0inc20.yaml", "seed_everything", 1993, PILOT + " exps/simplecil_inr.json:13"),
    ("simplecil_imagenet_r_b0inc20.yaml", "data.eval_batch_size", 128, PILOT + " models/simplecil.py:16"),
    # CoDyRA on MTIL: no MTIL script in their code; the protocol is ZSCL's, the shots the project page's, the training
    # values the authors' only released ones (runner_codyra.sh), as the preset says.
    *[
        ("codyra_mtil.yaml", key, value, source)
        for preset, key, value, source in AUTHORS_XTAIL
        if key not in ("protocol", "label_space", "evaluate_future", "stream.train_per_class")
    ],
    ("codyra_mtil.yaml", "protocol", "task_incremental", ZSCL + " src/models/evaluation.py:24-31 (own classes)"),
    ("codyra_mtil.yaml", "evaluate_future", True, ZSCL + " mtil/results.ipynb (11 x 11 matrix)"),
    ("codyra_mtil.yaml", "stream.train_per_class", 5, "CoDyRA@3eed0cc index.html (5-shot MTIL)"),
]

# main.py:36-37, the X-TAIL order, by the torchvision class each task reads.
XTAIL_ORDER = [
    "FGVCAircraft", "Caltech101", "DTD", "EuroSAT", "Flowers102", "Food101", "MNIST", "OxfordIIITPet",
    "StanfordCars", "SUN397",
]  # fmt: skip


def _load(preset: str) -> dict[str, Any]:
    return yaml.safe_load((PAPER / preset).read_text())


def _get(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"{dotted}: no {part!r}")
        value = value[part]
    return value


@pytest.mark.parametrize(("preset", "key", "expected", "source"), AUTHORS, ids=[f"{r[0]}:{r[1]}" for r in AUTHORS])
def test_preset_holds_the_authors_value(preset: str, key: str, expected: Any, source: str) -> None:
    value = _get(_load(preset), key)
    if isinstance(expected, float):
        assert value == pytest.approx(expected, rel=1e-9), f"{preset} {key}: {value}, the authors' is {source}"
    else:
        assert value == expected, f"{preset} {key}: {value!r}, the authors' {expected!r} is at {source}"


def test_every_preset_is_in_the_table() -> None:
    covered = {row[0] for row in AUTHORS}
    assert {p.name for p in PRESETS} <= covered, "add the new preset's values to AUTHORS"
    assert covered <= {p.name for p in PRESETS}, "a row names a preset that does not exist"


# A pinned repository (name@commit) and a file of it: exps/*.json, config(s)/*.yaml or the CoDyRA run script.
_PINNED = re.compile(r"[\w/-]+@[0-9a-f]{7}\b")
_SOURCE_FILE = re.compile(
    r"\b(exps|configs?)/[\w./-]+\.(json|yaml|py)\b|\brunner_codyra\.sh\b|\bargs/\w+_publish\.csv\b|\bFeCAM_vit_[\w-]+\.py\b"
)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_names_its_sources(preset: Path) -> None:
    comments = "\n".join(line.split("#", 1)[1] for line in preset.read_text().splitlines() if "#" in line)
    assert _PINNED.search(comments), f"{preset.name}: name the authors' repository and commit (repo@abc1234)"
    assert _SOURCE_FILE.search(comments), f"{preset.name}: name the authors' file the values come from"


# ZSCL's mtil/scripts/ZSCL.sh:8, order I.
MTIL_ORDER = [*XTAIL_ORDER[:2], "CIFAR100", *XTAIL_ORDER[2:]]


def test_codyra_mtil_preset_follows_zscl_order_one() -> None:
    tasks = _get(_load("codyra_mtil.yaml"), "stream.tasks")
    assert [task["source"]["class"] for task in tasks] == MTIL_ORDER


def test_codyra_xtail_preset_prompts_each_dataset_with_its_own_template() -> None:
    tasks = _get(_load("codyra_xtail.yaml"), "stream.tasks")
    prompts = {task["dataset"]: task["prompt"] for task in tasks}
    assert len(prompts) == 10 and all(prompt.count("{}") == 1 for prompt in prompts.values())
    # CoDyRA's scenario_datasets/collections.py:146-154: class 'number: "<name>"' in 'a photo of the number: "{}".'
    assert prompts["MNIST"].format("0 - zero") == 'a photo of the number: "number: "0 - zero"".'
    assert prompts["Food 101"] == "a photo of {}, a type of food."  # RAIL's food101.py:5 (see the preset)


def test_codyra_preset_follows_the_xtail_order() -> None:
    tasks = _get(_load("codyra_xtail.yaml"), "stream.tasks")
    assert [task["source"]["class"] for task in tasks] == XTAIL_ORDER
