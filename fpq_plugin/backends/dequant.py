"""The ``dequant`` backend: dequantize the weight on the fly and run the float op in the input's dtype.

Works on every device (CPU, Ampere, Apple): the memory saving of quantized storage without FP8 hardware. When the
layer has an activation quantizer, the activation is rounded through its grid too, so the numerics stay those of
the quantized model (only the arithmetic dtype differs from ``reference``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fpq_plugin.quantizers import fake_quantize_activation


def quantize_input(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input rounded through its static activation quantizer, in ``x``'s dtype (identity if none)."""
    if layer.input_format is None:
        return x
    grid = fake_quantize_activation(x, layer.input_format, layer.input_scale, layer.input_zero_point)
    return (grid * layer.input_scale).to(x.dtype)


class DequantBackend:
    """Dequantize-then-compute in the input dtype."""

    name = "dequant"

    def supports(self, layer, x: torch.Tensor) -> str | None:
        return None

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        return run_float_op(layer, x, layer.dequantized_weight(x.dtype))

    def conv2d(self, layer, x: torch.Tensor) -> torch.Tensor:
        return run_float_op(layer, x, layer.dequantized_weight(x.dtype))


def run_float_op(layer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's Linear/Conv2d on its quantized input with an already dequantized ``weight`` (x's dtype)."""
    weight = weight.to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    x = quantize_input(layer, x)
    if layer.kind == "linear":
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
