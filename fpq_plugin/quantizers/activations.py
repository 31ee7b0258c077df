"""Activation quantization with a static per-tensor scale (and zero point for INT8).

At inference an activation ``x`` becomes ``x_hat = (value(code) - zp) * s`` with
``code = encode(x * (1 / s) + zp)``. The reciprocal is computed once in fp32 so the reference and the fused GPU
kernels perform the identical multiply before the cast.
"""

from __future__ import annotations

import torch

from fpq_plugin.errors import LayerQuantizationError
from fpq_plugin.formats import Format, get_format


def activation_params(
    fmt: Format | str, amax: float, amin: float | None = None, *, layer: str = "<activation>"
) -> tuple[float, float | None]:
    """Static scale (and INT zero point) from an observed range.

    FP: ``scale = amax / fmt.max_value`` (symmetric). INT: asymmetric over ``[min(amin, 0), max(amax, 0)]``.
    """
    fmt = get_format(fmt)
    if not (amax == amax) or amax in (float("inf"), float("-inf")):
        raise LayerQuantizationError(f"{layer}: observed activation range is not finite ({amax}); check the inputs")
    if fmt.kind == "fp":
        amax = abs(amax)
        return (amax / fmt.max_value if amax > 0 else 1.0), None
    lo = min(amin if amin is not None else -amax, 0.0)
    hi = max(amax, 0.0)
    span = hi - lo
    scale = span / fmt.qmax if span > 0 else 1.0
    zero_point = float(min(max(round(-lo / scale), 0), fmt.qmax))
    return scale, zero_point


def fake_quantize_activation(
    x: torch.Tensor, fmt: Format, scale: torch.Tensor, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """Grid values ``value(code) - zp`` in fp32 (multiply by ``scale`` to get ``x_hat``)."""
    inv = torch.reciprocal(scale.float())
    scaled = x.float() * inv
    if zero_point is None:
        return fmt.quantize(scaled)
    return fmt.quantize(scaled + zero_point) - zero_point
