"""The ``reference`` backend: pure PyTorch, fp32, any device; the oracle every fast kernel is tested against.

It performs the arithmetic of the fused kernels exactly up to summation order::

    q_x = cast_fmt(clamp(x * (1 / s_x)))                 activation codes as values (fp32)
    q_w = value(weight_code) - zp_w                        weight grid values (fp32)
    y   = (q_x @ q_w^T) * (s_x * s_w[n]) + bias           fp32 accumulate, epilogue scale, then output dtype

Products of two 8-bit floats are exact in fp32, so only the order of the fp32 sums differs from a GPU kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fpq_plugin.quantizers import fake_quantize_activation


def _input_grid(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
    if layer.input_format is None:
        return x.float(), 1.0
    grid = fake_quantize_activation(x, layer.input_format, layer.input_scale, layer.input_zero_point)
    return grid, layer.input_scale


def _bias(layer) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.float()


class ReferenceBackend:
    """fp32 emulation of the quantized arithmetic (slow, exact, portable)."""

    name = "reference"

    def supports(self, layer, x: torch.Tensor) -> str | None:
        return None

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        q_x, s_x = _input_grid(layer, x)
        y = F.linear(q_x, layer.weight_grid_values()) * (s_x * layer.weight_scale)
        if layer.bias is not None:
            y = y + _bias(layer)
        return y.to(x.dtype)

    def conv2d(self, layer, x: torch.Tensor) -> torch.Tensor:
        q_x, s_x = _input_grid(layer, x)
        w = layer.weight_grid_values().reshape(layer.weight_shape)
        y = F.conv2d(q_x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        y = y * (s_x * layer.weight_scale).reshape(1, -1, 1, 1)
        if layer.bias is not None:
            y = y + _bias(layer).reshape(1, -1, 1, 1)
        return y.to(x.dtype)
