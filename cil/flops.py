"""Training FLOPs with ``torch.utils.flop_counter``, corrected for grouped convolutions.

torch counts the weight gradient of a grouped convolution as if the convolution were dense, ``groups`` times too
many FLOPs (32x to 1152x for EfficientNet's depthwise layers, which made a backward pass look 40x as costly as
the forward pass). Both gradients of a convolution, input and weight, cost exactly what its forward pass costs,
grouped or not; :func:`flop_counter` counts them so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

__all__ = ["flop_counter"]


def _conv_backward_flop(
    grad_out_shape: Any,
    x_shape: Any,
    w_shape: Any,
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: Any,
    output_mask: list[bool],
    out_shape: Any,
    **kwargs: Any,
) -> int:
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)  # w_shape has C_in / groups
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` (matrix multiplications, convolutions, attention; forward and backward) with
    the grouped-convolution correction."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})
