"""FLOP counting: torch's counter with the grouped-convolution correction."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cil.flops import flop_counter


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_a_convolution_backward_costs_twice_its_forward_whatever_its_groups(groups: int) -> None:
    conv = torch.nn.Conv2d(16, 32, 3, groups=groups)
    x = torch.randn(2, 16, 9, 9, requires_grad=True)
    with flop_counter() as forward:
        out = conv(x)
    with flop_counter() as both:
        conv(x).sum().backward()
    expected = 2 * 2 * 32 * 7 * 7 * (16 // groups) * 3 * 3  # 2 FLOPs per MAC, N, C_out, H' W', C_in / groups, k^2
    assert forward.get_total_flops() == expected and out.shape == (2, 32, 7, 7)
    assert both.get_total_flops() == 3 * expected  # forward + input gradient + weight gradient
    with FlopCounterMode(display=False) as torch_count:
        conv(x).sum().backward()
    if groups == 1:  # the correction changes nothing for dense convolutions
        assert torch_count.get_total_flops() == both.get_total_flops()
    else:  # torch counts the weight gradient as dense
        assert torch_count.get_total_flops() > both.get_total_flops()
