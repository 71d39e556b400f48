"""Scoring tasks before they are trained: the zero-shot baseline and the upper triangle of the accuracy matrix.

Forward transfer (Lopez-Paz & Ranzato, 2017) and MTIL's *Transfer* (Zheng et al., ZSCL, 2023) need ``R[i, j]`` for
``j > i``, task ``j``'s score after step ``i`` and so before it was trained, and FWT needs ``baseline[j]``, its score
before the first task. A model can score such a task when

* the method scores classes by their names (:attr:`cil.method.CILMethod.scores_unseen`: a CLIP class-name head),
  through :meth:`~cil.method.CILMethod.zero_shot_classifier`; or
* the task's classes are already in the method's label space: every later domain of a domain-incremental stream.

Which classes compete for a test image (``label_space``):

* ``seen`` (default): the seen classes (protocol ``class_incremental``) or the image's own task's classes
  (``task_incremental``, MTIL's protocol: each dataset among its own class names, trained yet or not).
* ``stream``: every class of the stream, trained on or not (X-TAIL, Xu et al. 2024): at every step (and, with
  ``evaluate_future``, before the first) seen and future tasks alike are scored among all the stream's classes,
  each by its prompt; two classes with the same prompt are refused, as the later one could never win.

With ``class_incremental`` and ``seen``, a future task's classes are not among the candidates, so the engine
refuses ``evaluate_future`` there unless the stream is domain-incremental. The engine stays a loop: it asks
:class:`ZeroShotScorer` for logits where :func:`needs_zero_shot` says the method's own head cannot give them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cil.method import CILMethod
from cil.stream import Stream
from cil.task import Task

__all__ = ["LABEL_SPACES", "ZeroShotScorer", "check_evaluation", "needs_zero_shot"]

LABEL_SPACES = ("seen", "stream")


def check_evaluation(method: CILMethod, stream: Stream, protocol: str, label_space: str, evaluate_future: bool) -> None:
    """Refuses, in one line each, the settings whose numbers would not mean what their names say."""
    name = type(method).__name__
    if label_space not in LABEL_SPACES:
        raise ValueError(f"label_space must be one of {LABEL_SPACES}, got {label_space!r}")
    if label_space == "stream":
        if protocol != "class_incremental":
            raise ValueError(
                "label_space stream scores every image among all the stream's classes (X-TAIL), which protocol "
                f"{protocol} replaces by each task's own classes; use protocol class_incremental, or label_space seen"
            )
        if not method.scores_unseen:
            raise ValueError(
                f"label_space stream needs a method that scores classes it has not trained on by name, and {name} "
                "cannot (codyra can, with an open_clip backbone); use label_space seen"
            )
        _check_prompts_differ(method, stream)
    if not evaluate_future:
        return
    if stream.scenario == "domain_incremental":
        return  # every domain after the first holds classes the head already has; the baseline needs scores_unseen
    if not method.scores_unseen:
        raise ValueError(
            f"evaluate_future scores tasks before they are trained, and {name} has no outputs for classes it has not "
            "trained on; use a method that scores classes by name (codyra with an open_clip backbone), a "
            "domain-incremental stream, or evaluate_future false"
        )
    if protocol == "class_incremental" and label_space == "seen":
        raise ValueError(
            "evaluate_future with protocol class_incremental and label_space seen would score a future task's images "
            "among the seen classes only, none of which is theirs; use protocol task_incremental (MTIL: each task "
            "among its own classes) or label_space stream (X-TAIL: among every class of the stream)"
        )


def _check_prompts_differ(method: CILMethod, stream: Stream) -> None:
    """Under the stream label space two classes with the same prompt score alike, so the later one's images could
    never be right (an argmax picks the first): refused, naming them."""
    prompts = method.zero_shot_prompts(stream.label_tasks)
    names = [(task.name, name) for task in stream.label_tasks for name in task.class_names]
    first: dict[str, int] = {}
    clashes = []
    for index, prompt in enumerate(prompts):
        if prompt in first:
            clashes.append(f"{names[index][1]!r} of {names[index][0]} and of {names[first[prompt]][0]}")
        first.setdefault(prompt, index)
    if clashes:
        raise ValueError(
            f"label_space stream scores every image among all the stream's classes, and {len(clashes)} classes have "
            f"the prompt of an earlier one ({'; '.join(clashes[:3])}{'; ...' if len(clashes) > 3 else ''}), so their "
            "images could never be scored right; give those tasks their own prompt (a stream task's `prompt: "
            "'a photo of a {}, a type of food.'`), or use label_space seen"
        )


def needs_zero_shot(task: Task, method: CILMethod, label_space: str) -> bool:
    """Whether ``task`` is scored by the method's zero-shot classifier rather than its head: every task under the
    ``stream`` label space, and tasks with classes the head does not have yet (future tasks, the baseline)."""
    return label_space == "stream" or bool(method.unseen_classes(task))


class ZeroShotScorer:
    """Logits over every class of the stream, ``[N, C_stream]``, from the method's zero-shot classifier.

    The classifier (for CLIP: the text embeddings of every class name) is built on first use after each
    :meth:`reset`, once per evaluation step, since the method changes between steps.
    """

    def __init__(self, method: CILMethod, stream: Stream) -> None:
        self.method, self.stream = method, stream
        self._classify: Callable[[torch.Tensor], torch.Tensor] | None = None

    def reset(self) -> None:
        self._classify = None

    @torch.no_grad()
    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        method = self.method
        with method.evaluating():
            if self._classify is None:
                self._classify = method.zero_shot_classifier(self.stream.label_tasks)
            logits = [self._classify(chunk.to(method.device)).float().cpu() for chunk in embeddings.split(4096)]
        return torch.cat(logits)
