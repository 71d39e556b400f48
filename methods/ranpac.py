"""RanPAC: random projections and a ridge readout on top of a first-session-adapted pre-trained model.

McDonnell, Gong, Parvaneh, Abbasnejad, van den Hengel. "RanPAC: Random Projections and Pre-trained Models for
Continual Learning" (NeurIPS 2023; arXiv:2307.02251). Facts from the authors' code (``RanPAC/RanPAC@012927f``,
``RanPAC.py``, ``inc_net.py``, ``args/*_publish.csv``) and LAMDA-PILOT's port (``models/ranpac.py``,
``exps/ranpac*.json``).

1. **First session** (:class:`cil.adaptation.FirstTaskAdaptation`): a PEFT module (adapter with bottleneck 64 on
   CIFAR, SSF on ImageNet-R in the authors' tables) is trained on the first task with a cosine classifier, then
   frozen; ``adapt: none`` keeps the PTM (their ``ncm`` rows).
2. **Random projection**: after the first session, ``P [D, M]`` with standard normal entries is drawn once and never
   trained; an image's feature is ``h = relu(z P)``, ``z`` the adapted model's embedding.
3. **Ridge readout**, after every task: ``G += H^T H``, ``Q += H^T Y`` over the task's training images (evaluation
   transform), ``W = (G + lambda I)^-1 Q``; logits are ``h W`` (:class:`cil.ridge.RandomProjectionRidge`). No image
   is kept; the result equals a ridge regression on all images seen.
4. **lambda per task**: the task's training features in a random order, ridges ``10^-8 .. 10^8``, each fitted on
   the first 80 % and scored by mean squared error on the rest; the best one solves the full ``G``.

Departures:

- lambda's split orders the task's features by a permutation from the run's seeded RNG; theirs is the order of a
  shuffled ``DataLoader`` (also seeded, but not the same draws).
- ``P`` is drawn from the run's CPU generator; theirs with ``torch.randn`` on the GPU (another stream).
- The linear-algebra device is the trainer's (theirs: ``G`` and the solves on the CPU), in ``dtype`` float32 as
  theirs; float64 is a switch (``precision``), and agrees with float32 except where ``G + lambda I`` is near singular.
- ``readout: cosine`` scores as LAMDA-PILOT's port does (the cosine between ``h`` and the readout's rows, times the
  first session's trained scale); the authors' code scores ``h W`` (``readout: linear``, the default). The scale is
  one positive number per run and changes no ranking, so ``cosine`` leaves it out.
- Their one-hot targets span every class of the dataset from the first task on (zero columns for classes not seen
  yet); ours span the seen classes. The readout of a seen class and lambda's choice are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cil.adaptation import FirstTaskAdaptation
from cil.backbones import Backbone
from cil.method import FeatureFn, register_method
from cil.ridge import RandomProjectionRidge, select_ridge
from cil.task import Task

__all__ = ["RanPAC"]

PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
RIDGES = tuple(10.0**exponent for exponent in range(-8, 9))  # the authors' 10^-8 .. 10^8


@register_method("ranpac")
class RanPAC(FirstTaskAdaptation):
    """RanPAC (see the module docstring).

    Args:
        backbone: The pre-trained model; adapted in place on the first task, then frozen.
        adapt: First-session adaptation (``adapter``, ``ssf``, ``vpt_shallow``, ``vpt_deep``, ``finetune``, ``none``).
        epochs: First-session epochs (authors: 20).
        lr: First-session SGD learning rate (authors: 0.01), cosine-annealed to 0.
        momentum: SGD momentum.
        weight_decay: First-session weight decay (authors: 5e-4).
        peft_options: Overrides of the PEFT module's hyper-parameters.
        projection_dim: ``M`` (authors: 10,000); 0 skips the projection and solves on ``z`` itself (their ``M = 0``
            rows: decorrelation only).
        ridge: A fixed lambda; None chooses one per task (the authors).
        ridges: The candidates lambda is chosen from (authors: ``10^-8 .. 10^8``).
        fit_fraction: Share of the task's features lambda is fitted on; it is scored on the rest (authors: 0.8).
        precision: ``float32`` (authors) or ``float64`` for ``G``, ``Q`` and the solves.
        readout: ``linear`` (the authors' code) or ``cosine`` (LAMDA-PILOT's port).
    """

    supports_distributed = True  # tests/test_distributed.py

    def __init__(
        self,
        backbone: Backbone,
        adapt: str = "adapter",
        epochs: int = 20,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        peft_options: dict[str, Any] | None = None,
        projection_dim: int = 10_000,
        ridge: float | None = None,
        ridges: Sequence[float] = RIDGES,
        fit_fraction: float = 0.8,
        precision: str = "float32",
        readout: str = "linear",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if readout not in ("linear", "cosine"):
            raise ValueError(f"readout must be 'linear' (the authors') or 'cosine' (PILOT's port), got {readout!r}")
        if projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0: no projection), got {projection_dim}")
        if ridge is None and (not ridges or not 0.0 < fit_fraction < 1.0):
            raise ValueError("choosing lambda needs candidate ridges and a fit_fraction in (0, 1); or set ridge")
        super().__init__(backbone, adapt, epochs, lr, momentum, weight_decay, peft_options)
        self.ridge, self.ridges, self.fit_fraction = ridge, [float(r) for r in ridges], fit_fraction
        self.precision, self.readout = precision, readout
        dim = backbone.num_features
        self.head: RandomProjectionRidge = RandomProjectionRidge(
            dim, projection_dim, dtype=PRECISIONS[precision], cosine=readout == "cosine"
        )

    def after_task(self, task: Task, features: FeatureFn) -> None:
        super().after_task(task, features)
        if task.index == 0:
            self.head.draw()
        embeddings, labels = features(task.train)  # [N, D] under the adapted, frozen model
        device = self.compute_device(self.head.gram.device)  # the GPU when there is one
        h = self.head.accumulate(embeddings.to(device), labels)  # [N, M]
        ridge = self.ridge
        if ridge is None:
            order = torch.randperm(len(h)).to(device)
            targets = F.one_hot(labels.to(device), self.head.num_classes).to(h.dtype)  # [N, C]
            ridge = select_ridge(h[order], targets[order], self.ridges, self.fit_fraction)
        self.head.solve(ridge, device)
        self.task_info["ridge"] = ridge
        if self.count_flops:
            self.extra_train_flops += self._solve_flops(len(h), embeddings.shape[1])

    def _solve_flops(self, images: int, dim: int) -> float:
        """Multiply-adds x 2 of the projection, the sums and the solves (LU: ``2/3 M^3``), which the engine's FLOP
        sampler does not see."""
        m, c = self.head.width, self.head.num_classes
        solve = 2 / 3 * m**3 + 2 * m**2 * c
        flops = 2.0 * images * (dim * self.head.projection_dim + m * m + m * c) + solve
        if self.ridge is None:
            fit = int(images * self.fit_fraction)
            flops += 2.0 * fit * (m * m + m * c) + len(self.ridges) * (solve + 2.0 * (images - fit) * m * c)
        return flops
