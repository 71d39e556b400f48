"""CLIP through ``open_clip`` (optional extra ``clip``): the image tower as a backbone, class-name text embeddings as
the classifier.

``Backbone(name="open_clip/ViT-B-16", pretrained=True)`` loads OpenAI's weights through open_clip (hub access or
its cache); ``checkpoint_path`` loads a local open_clip checkpoint; ``model_kwargs`` with ``embed_dim``,
``vision_cfg`` and ``text_cfg`` builds an architecture from a config (randomly initialised, as the tests do).
The backbone's features are CLIP's projected image embeddings; :class:`ClassNameHead` scores them against the text
embeddings of each class's prompt (``template.format(class_name)``, with a task's own template where the stream gives
one: :func:`class_prompts`), CLIP's zero-shot classifier, which CoDyRA keeps as its classifier.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cil.task import Task

__all__ = ["ClassNameHead", "build_open_clip", "class_prompts"]

PREFIX = "open_clip/"


def build_open_clip(
    name: str, pretrained: bool, checkpoint_path: str | None, model_kwargs: dict[str, Any], input_size: int | None
) -> tuple[Any, Any, int, tuple[float, ...], tuple[float, ...]]:
    """``(model, tokenizer, input_size, mean, std)`` for ``open_clip/<architecture>``."""
    try:
        open_clip = importlib.import_module("open_clip")
    except ImportError as error:
        raise FileNotFoundError(f"{name!r} needs open_clip: pip install -e '.[clip]'") from error
    architecture = name.removeprefix(PREFIX)
    if {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_kwargs):
        model = open_clip.CLIP(**model_kwargs)
    else:
        source = checkpoint_path or ("openai" if pretrained else None)
        extra: dict[str, Any] = {"force_image_size": input_size} if input_size else {}
        if source == "openai":  # OpenAI trained with QuickGELU; open_clip's plain configs use GELU
            extra["force_quick_gelu"] = True
        try:
            model = open_clip.create_model(architecture, pretrained=source, **model_kwargs, **extra)
        except RuntimeError as error:
            raise KeyError(f"open_clip has no model {architecture!r}; see open_clip.list_models()") from error
    size = model.visual.image_size
    side = int(size[-1] if isinstance(size, (tuple, list)) else size)
    mean = tuple(float(v) for v in open_clip.OPENAI_DATASET_MEAN)
    std = tuple(float(v) for v in open_clip.OPENAI_DATASET_STD)
    return (
        model,
        open_clip.get_tokenizer(architecture if architecture in open_clip.list_models() else "ViT-B-16"),
        side,
        mean,
        std,
    )


def class_prompts(tasks: Sequence[Task], template: str) -> list[str]:
    """The prompt of every class of ``tasks``, in global id order: the task's own template (``metadata["prompt"]``,
    a stream task's ``prompt:``; CoDyRA's and RAIL's code give each dataset its own) or ``template``, filled with the
    class name (underscores as spaces). Per-dataset templates also keep apart classes that two datasets name alike
    (Caltech-101's and Food-101's "pizza"), which one template would make indistinguishable."""
    return [
        (task.metadata.get("prompt") or template).format(name.replace("_", " "))
        for task in tasks
        for name in task.class_names
    ]


class ClassNameHead(nn.Module):
    """``logit_scale * cos(image embedding, text embedding of each class's prompt)``, ``[B, C_seen]``.

    The text embeddings of the seen classes are cached in a buffer (checkpointed) by :meth:`refresh`; during
    training :meth:`logits` recomputes the current task's with gradients, so LoRA in the text tower learns.
    """

    text: torch.Tensor

    def __init__(self, clip: Any, tokenizer: Any, template: str = "a photo of a {}.") -> None:
        super().__init__()
        self.clip: list[Any] = [clip]  # a list: the backbone owns the module, the head must not register it twice
        self.tokenizer, self.template = tokenizer, template
        self.prompts: list[str] = []  # one per seen class, in global id order
        self.register_buffer("text", torch.zeros(0, int(clip.visual.output_dim)))

    def expand(self, num_new: int) -> None:
        self.text = torch.cat([self.text, self.text.new_zeros(num_new, self.text.shape[1])])

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings of ``prompts`` ``[N, E]`` (differentiable)."""
        clip = self.clip[0]
        tokens = self.tokenizer(list(prompts), context_length=int(clip.context_length))  # [N, L]
        return F.normalize(clip.encode_text(tokens.to(self.text.device)), dim=-1)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recomputes the cached text embeddings of every seen class."""
        if len(self.prompts) != self.text.shape[0]:
            raise ValueError(f"{len(self.prompts)} prompts for {self.text.shape[0]} classes")
        self.text = self.encode(self.prompts).to(self.text)

    def logits(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale = self.clip[0].logit_scale.exp().detach()
        return scale * F.normalize(z.float(), dim=-1) @ text.float().T

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.logits(z, self.text)
