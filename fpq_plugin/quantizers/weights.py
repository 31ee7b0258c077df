"""Weight quantization: scales (the flexible bias), zero points for INT, and round-to-nearest codes.

Weights are handled as 2-D ``(N, K)``: ``N`` output channels, ``K = in_features`` (Linear) or
``in_channels / groups * kh * kw`` (Conv2d). A quantized weight is ``w_hat[n, k] = (value(code[n, k]) - zp[n]) * s[n]``
with ``zp = 0`` for FP formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fpq_plugin.errors import LayerQuantizationError
from fpq_plugin.formats import Format, get_format

GRANULARITIES = ("channel", "tensor")
SCALE_METHODS = ("absmax", "mse")

# Shrink factors tried by the MSE search: the clipping value is factor * absmax. 1.0 first so ties keep absmax.
DEFAULT_SHRINK_FACTORS = tuple(round(1.0 - 0.025 * i, 3) for i in range(25))  # 1.0 .. 0.4


@dataclass
class QuantizedWeight:
    """Codes and scales of one weight matrix.

    Attributes:
        format: the number format of the codes.
        codes: integer ``(N, K)`` codes (uint8), unpacked.
        scale: fp32 ``(N,)`` per-channel or ``(1,)`` per-tensor.
        zero_point: fp32, same shape as ``scale``, integer-valued; ``None`` for FP formats.
    """

    format: Format
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """fp32 ``(N, K)`` weight the codes stand for."""
        return dequantize_codes(self.format, self.codes, self.scale, self.zero_point)


def dequantize_codes(
    fmt: Format, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """``(value(codes) - zero_point) * scale`` in fp32, scale/zero point broadcast over the last dimension."""
    values = fmt.decode(codes)
    if zero_point is not None:
        values = values - zero_point.unsqueeze(-1)
    return values * scale.unsqueeze(-1)


def _reduce_dims(w: torch.Tensor, granularity: str) -> torch.Tensor:
    if granularity == "channel":
        return w
    return w.reshape(1, -1)


def absmax_params(
    w: torch.Tensor, fmt: Format, granularity: str = "channel", shrink: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point for INT) mapping ``shrink * range`` of each row (or the tensor) onto the grid.

    FP: ``scale = shrink * max|w| / fmt.max_value``. INT (asymmetric, as in Q-Diffusion): the range
    ``[min(w, 0), max(w, 0)] * shrink`` is mapped onto ``0..qmax`` with an integer zero point.
    All-zero rows get scale 1 so they encode to exact zeros instead of dividing by zero.
    """
    w = _reduce_dims(w.detach().float(), granularity)
    if fmt.kind == "fp":
        amax = w.abs().amax(dim=1) * shrink
        scale = amax / fmt.max_value
        return torch.where(amax > 0, scale, torch.ones_like(scale)), None
    lo = w.amin(dim=1).clamp(max=0) * shrink
    hi = w.amax(dim=1).clamp(min=0) * shrink
    span = hi - lo
    scale = torch.where(span > 0, span / fmt.qmax, torch.ones_like(span))
    zero_point = torch.round(-lo / scale).clamp(0, fmt.qmax)
    return scale, zero_point


def encode_weight(
    w: torch.Tensor, fmt: Format, scale: torch.Tensor, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """Round-to-nearest codes (uint8, same shape as the 2-D ``w``) for the given scale / zero point."""
    scaled = w.detach().float() / scale.unsqueeze(-1)
    if zero_point is not None:
        scaled = scaled + zero_point.unsqueeze(-1)
    return fmt.encode_fast(scaled)


def fake_quantize_weight(
    w: torch.Tensor, fmt: Format, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """``w`` rounded to the grid of ``fmt`` under ``scale`` (and zero point), in fp32; scale broadcasts on the last dim."""
    s = scale.unsqueeze(-1)
    if zero_point is None:
        return fmt.quantize(w / s) * s
    z = zero_point.unsqueeze(-1)
    return (fmt.quantize(w / s + z) - z) * s


def candidate_params(
    rows: torch.Tensor, fmt: Format, factors: torch.Tensor, whole: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(F, r)`` scales (and INT zero points) of ``rows`` for each clipping factor in ``factors`` (shape ``(F,)``).

    ``whole`` (the full weight) makes the range per tensor instead of per row. Shared by the data-free MSE search
    and the layer-output search of :mod:`fpq_plugin.method.search`.
    """
    ref = whole.reshape(1, -1) if whole is not None else rows
    if fmt.kind == "fp":
        base = absmax_params(ref, fmt)[0].expand(rows.shape[0])
        return factors[:, None] * base[None, :], None
    # INT: shrink the [lo, hi] range; recompute the integer zero point for each candidate.
    lo = factors[:, None] * ref.amin(1).clamp(max=0).expand(rows.shape[0])[None]
    hi = factors[:, None] * ref.amax(1).clamp(min=0).expand(rows.shape[0])[None]
    span = hi - lo
    scale = torch.where(span > 0, span / fmt.qmax, torch.ones_like(span))
    return scale, torch.round(-lo / scale).clamp(0, fmt.qmax)


def mse_params(
    w: torch.Tensor,
    fmt: Format,
    granularity: str = "channel",
    shrink_factors: tuple[float, ...] = DEFAULT_SHRINK_FACTORS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row, the clipping factor among ``shrink_factors`` with the lowest squared weight error.

    This is the data-free part of the search (the paper's "bias search" with the weight itself as the objective);
    the calibration stage refines it with the layer-output error. All factors are tried in one batched pass over
    row chunks, so small layers do not pay per-call overhead and large ones stay within a bounded buffer.
    """
    w = _reduce_dims(w.detach().float(), granularity)
    factors = torch.tensor(shrink_factors, dtype=torch.float32, device=w.device)
    rows_per_chunk = max(1, (1 << 24) // (len(shrink_factors) * w.shape[1]))
    scales, zero_points = [], []
    for rows in w.split(rows_per_chunk):
        cand_scale, cand_zp = candidate_params(rows, fmt, factors)
        err = (fake_quantize_weight(rows[None], fmt, cand_scale, cand_zp) - rows[None]).pow(2).sum(dim=-1)  # (F, R)
        # argmin returns the first minimum: factor 1.0 (plain absmax) wins ties.
        best = err.argmin(dim=0)
        pick = torch.arange(rows.shape[0], device=w.device)
        scales.append(cand_scale[best, pick])
        if cand_zp is not None:
            zero_points.append(cand_zp[best, pick])
    return torch.cat(scales), (torch.cat(zero_points) if zero_points else None)


def quantize_weight(
    w: torch.Tensor,
    fmt: Format | str,
    *,
    granularity: str = "channel",
    scale_method: str = "absmax",
    layer: str = "<weight>",
) -> QuantizedWeight:
    """Quantize a 2-D weight ``(N, K)`` with round-to-nearest.

    Args:
        w: the float weight, ``(N, K)``.
        fmt: format or format name.
        granularity: ``"channel"`` (one scale per output row) or ``"tensor"``.
        scale_method: ``"absmax"`` or ``"mse"`` (clipping search on the weight error).
        layer: layer name, used in error messages.
    """
    fmt = get_format(fmt)
    if w.dim() != 2:
        raise LayerQuantizationError(f"{layer}: expected a 2-D weight (N, K), got shape {tuple(w.shape)}")
    if granularity not in GRANULARITIES:
        raise LayerQuantizationError(f"{layer}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not torch.isfinite(w).all():
        raise LayerQuantizationError(f"{layer}: the weight holds NaN or inf; fix the checkpoint before quantizing")
    if scale_method == "absmax":
        scale, zp = absmax_params(w, fmt, granularity)
    elif scale_method == "mse":
        scale, zp = mse_params(w, fmt, granularity)
    else:
        raise LayerQuantizationError(f"{layer}: scale_method must be one of {SCALE_METHODS}, got {scale_method!r}")
    return QuantizedWeight(fmt, encode_weight(w, fmt, scale, zp), scale, zp)


def choose_weight_format(
    w: torch.Tensor, candidates: tuple[str, ...], *, granularity: str = "channel", scale_method: str = "absmax"
) -> QuantizedWeight:
    """Quantize with each candidate format and keep the one with the lowest weight MSE (data-free choice)."""
    if len(candidates) == 1:
        return quantize_weight(w, candidates[0], granularity=granularity, scale_method=scale_method)
    best, best_err = None, float("inf")
    for name in candidates:
        qw = quantize_weight(w, name, granularity=granularity, scale_method=scale_method)
        err = float((qw.dequantize() - w.float()).pow(2).sum())
        if err < best_err:
            best, best_err = qw, err
    return best
