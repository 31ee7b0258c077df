"""Quantized layers: ``QLinear`` and ``QConv2d``, and the float type -> quantized type map used by ``quantize_``."""

from __future__ import annotations

from torch import nn

from fpq_plugin.nn.base import QuantizedLayer
from fpq_plugin.nn.conv import QConv2d
from fpq_plugin.nn.linear import QLinear

# Float layer class -> its quantized replacement. Subclasses (ComfyUI's ops.Linear, LoRA-compatible layers) match
# through isinstance, so ordering matters only if a class derives from both.
QUANTIZED_TYPES: dict[type[nn.Module], type[QuantizedLayer]] = {nn.Linear: QLinear, nn.Conv2d: QConv2d}
LAYER_KINDS: dict[str, type[QuantizedLayer]] = {"linear": QLinear, "conv2d": QConv2d}


def quantized_type_for(module: nn.Module) -> type[QuantizedLayer] | None:
    """The quantized class that replaces ``module``, or ``None`` when it is not a quantizable layer."""
    if isinstance(module, QuantizedLayer):
        return None
    for float_type, q_type in QUANTIZED_TYPES.items():
        if isinstance(module, float_type):
            return q_type
    return None


__all__ = ["LAYER_KINDS", "QConv2d", "QLinear", "QUANTIZED_TYPES", "QuantizedLayer", "quantized_type_for"]
