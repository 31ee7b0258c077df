"""The ``dequant`` backend: dequantize the weight on the fly and run the float op in the input's dtype.

Works on every device (CPU, Ampere, Apple): the memory saving of quantized storage without FP8 hardware. When the
layer has an activation quantizer, the activation is rounded through its grid too, so the numerics stay those of
the quantized model (only the arithmetic dtype differs from ``reference``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fpq_plugin.quantizers import fake_quantize_activation


def _input(layer, x: torch.Tensor) -> torch.Tensor:
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
        w = layer.dequantized_weight(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(_input(layer, x), w, bias)

    def conv2d(self, layer, x: torch.Tensor) -> torch.Tensor:
        w = layer.dequantized_weight(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.conv2d(_input(layer, x), w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
