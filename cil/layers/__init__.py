"""Parameter-efficient modules injected into timm Vision Transformers (never a forked ``vision_transformer.py``).

``inject(model, kind, layers=None, **hp)`` wraps submodules of the chosen blocks in place and returns the injected
modules; :func:`peft_parameters` lists their trainable parameters and :func:`freeze_except_peft` freezes the rest.
Kinds: ``adapter``, ``lora``, ``prefix``, ``vpt_shallow``, ``vpt_deep``, ``ssf``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

from cil.layers._adapter import Adapter, MLPWithAdapter, inject_adapter
from cil.layers._base import PEFTModule, select_blocks, unwrap, vit_blocks
from cil.layers._flat import FlatPEFT
from cil.layers._lora import LoRALinear, _AddLoRA, inject_lora, inject_lora_open_clip
from cil.layers._prompt import (
    PrefixAttention,
    PrefixSlot,
    PromptedBlock,
    inject_prefix,
    inject_prefix_slots,
    inject_vpt,
    prefixed_attention,
    prefixes_set,
)
from cil.layers._prompt_pool import ComponentPool, PromptPool, gram_schmidt_rows, l2_normalize, prompted_tokens
from cil.layers._ssf import ScaleShift, inject_ssf

__all__ = [
    "PEFT_KINDS",
    "Adapter",
    "ComponentPool",
    "FlatPEFT",
    "LoRALinear",
    "MLPWithAdapter",
    "PEFTModule",
    "PrefixAttention",
    "PrefixSlot",
    "PromptPool",
    "PromptedBlock",
    "ScaleShift",
    "freeze_except_peft",
    "gram_schmidt_rows",
    "inject",
    "inject_lora_open_clip",
    "inject_prefix_slots",
    "l2_normalize",
    "merge_lora",
    "peft_modules",
    "peft_parameters",
    "prefixed_attention",
    "prefixes_set",
    "prompted_tokens",
    "unload_lora",
    "unwrap",
    "vit_blocks",
]

PEFT_KINDS: dict[str, Callable[..., list[PEFTModule]]] = {
    "adapter": inject_adapter,
    "lora": inject_lora,
    "prefix": inject_prefix,
    "vpt_shallow": lambda model, blocks, **hp: inject_vpt(model, blocks, deep=False, **hp),
    "vpt_deep": lambda model, blocks, **hp: inject_vpt(model, blocks, deep=True, **hp),
    "ssf": inject_ssf,
}


def inject(model: nn.Module, kind: str, layers: Sequence[int] | None = None, **hp: Any) -> list[PEFTModule]:
    """Injects PEFT modules of ``kind`` into the blocks ``layers`` (default: all) of a timm ViT, in place; ``ssf``
    by default also scales and shifts the patch embedding and the final norm (``patch_embed`` / ``final_norm``).

    ``model`` may be a timm ``VisionTransformer`` or any module holding one as ``.model`` (``cil.Backbone``).
    """
    if kind not in PEFT_KINDS:
        raise KeyError(f"unknown PEFT kind {kind!r}; choose from {sorted(PEFT_KINDS)}")
    vit = getattr(model, "model", model)
    vit_blocks(vit)
    injected = PEFT_KINDS[kind](vit, select_blocks(vit, layers), **hp)
    for module in injected:  # new modules start in training mode; follow the model's (dropout!)
        module.train(vit.training)
    return injected


def peft_modules(model: nn.Module) -> list[PEFTModule]:
    """The outermost PEFT modules in ``model``."""
    found: list[PEFTModule] = []
    for module in model.modules():
        if isinstance(module, PEFTModule) and not any(module in set(outer.modules()) for outer in found):
            found.append(module)
    return found


def peft_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The injected modules' own parameters (never the wrapped pre-trained weights)."""
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, PEFTModule):
            for parameter in module.own_parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    yield parameter


def freeze_except_peft(model: nn.Module) -> None:
    """Freezes every parameter of ``model`` except the injected modules' own."""
    model.requires_grad_(False)
    for parameter in peft_parameters(model):
        parameter.requires_grad_(True)


def unload_lora(model: nn.Module) -> int:
    """Merges every :class:`LoRALinear` into its weight and puts the plain layer back in its place, so the model
    has its original architecture and parameter count again; returns how many modules were removed."""
    from torch.nn.utils import parametrize

    removed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear) and not isinstance(parent, _AddLoRA):  # those merge below
                child.merge()
                setattr(parent, name, child.base)
                removed += 1
        if parametrize.is_parametrized(parent):  # LoRA as a weight parametrization (open_clip)
            for tensor in list(parent.parametrizations.keys()):  # type: ignore[union-attr, operator]
                if any(isinstance(p, _AddLoRA) for p in parent.parametrizations[tensor]):  # type: ignore[index]
                    parametrize.remove_parametrizations(parent, tensor, leave_parametrized=True)
                    removed += 1
    return removed


def merge_lora(model: nn.Module) -> int:
    """Merges every :class:`LoRALinear` update into its frozen weight; returns how many were merged."""
    merged = 0
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()
            merged += 1
    return merged
