"""Choosing scales and codes: weights (per channel or per tensor) and activations (static per tensor)."""

from fpq_plugin.quantizers.activations import activation_params, fake_quantize_activation
from fpq_plugin.quantizers.weights import (
    QuantizedWeight,
    absmax_params,
    choose_weight_format,
    dequantize_codes,
    encode_weight,
    mse_params,
    quantize_weight,
)

__all__ = [
    "QuantizedWeight",
    "absmax_params",
    "activation_params",
    "choose_weight_format",
    "dequantize_codes",
    "encode_weight",
    "fake_quantize_activation",
    "mse_params",
    "quantize_weight",
]
