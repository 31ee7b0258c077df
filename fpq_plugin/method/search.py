"""The paper's per-tensor encoding and bias search (LLM-FP4 style), on the layer-output error.

For a layer ``y = x W^T`` and calibration inputs ``X`` (rows: tokens, or conv patches), quantizing the weight
changes the output by ``X (W - Q(W))^T``; its squared norm per output channel ``n`` is ``d_n^T H d_n`` with
``d_n = w_n - q(w_n)`` and ``H = X^T X / R``. So the weight search needs ``H`` (K x K) once, then scores every
(format, per-channel clipping factor) candidate with two small matmuls: the bias (scale) per output channel that
minimises the *output* error, and the format (e2m1 / e3m0 / e1m2, or e4m3 / e5m2) with the lowest total.

The activation search then picks the per-tensor format (e4m3fn vs e5m2 when the recipe says ``auto``) and its
static scale by the error of ``Q(X) Q(W)^T`` against ``X Q(W)^T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fpq_plugin.formats import get_format
from fpq_plugin.quantizers import QuantizedWeight, activation_params, encode_weight, fake_quantize_activation
from fpq_plugin.quantizers.weights import candidate_params, fake_quantize_weight


PERCENTILES = (0.999, 0.9999)  # of |x|, proposed as activation clipping values besides the absmax factors


@dataclass
class LayerStats:
    """What a layer's inputs looked like on the calibration data.

    Attributes:
        rows: fp32 ``(R, K)`` sample of input rows (conv inputs unfolded to patches), or None for grouped convs.
        amin, amax: range over all inputs seen (not only the sampled rows).
    """

    rows: torch.Tensor | None
    amin: float
    amax: float


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's input as the ``(R, K)`` matrix its weight multiplies (None for grouped convolutions)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str):
            return None
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, K, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


class StatsCollector:
    """Forward pre-hooks that sample input rows and track ranges of several layers at once."""

    def __init__(self, layers: dict[str, nn.Module], rows_per_call: int, seed: int) -> None:
        self.layers = layers
        self.rows_per_call = rows_per_call
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self.ranges: dict[str, list[float]] = {}
        self.handles = []

    def __enter__(self) -> StatsCollector:
        for name, module in self.layers.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(name, module)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, name: str, module: nn.Module):
        def hook(_m, args):
            x = args[0].detach()
            lo, hi = float(x.min()), float(x.max())
            old = self.ranges.get(name)
            self.ranges[name] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]
            rows = input_rows(module, x.float())
            if rows is None:
                self.rows[name] = None
                return
            if self.rows[name] is None:
                return
            if rows.shape[0] > self.rows_per_call:
                pick = torch.randperm(rows.shape[0], generator=self.generator)[: self.rows_per_call]
                rows = rows[pick.to(rows.device)]
            self.rows[name].append(rows)

        return hook

    def stats(self) -> dict[str, LayerStats]:
        out = {}
        for name in self.layers:
            if name not in self.ranges:
                continue
            rows = self.rows[name]
            out[name] = LayerStats(torch.cat(rows) if rows else None, *self.ranges[name])
        return out


def _hessian(rows: torch.Tensor | None, k: int, device: torch.device) -> torch.Tensor:
    if rows is None or rows.shape[0] == 0:
        return torch.eye(k, device=device)
    return rows.T @ rows / rows.shape[0]


def search_weight(
    w: torch.Tensor,
    candidates: tuple[str, ...],
    stats: LayerStats | None,
    *,
    shrink_factors: tuple[float, ...],
    granularity: str = "channel",
) -> tuple[QuantizedWeight, dict[str, float]]:
    """Choose format and per-channel scales minimising the layer-output error; returns the weight and the error
    of each candidate format (relative to the output energy) for reporting."""
    w = w.detach().float()
    n, k = w.shape
    h = _hessian(stats.rows if stats is not None else None, k, w.device)
    factors = torch.tensor(shrink_factors, device=w.device)
    energy = float(((w @ h) * w).sum()) or 1.0
    errors: dict[str, float] = {}
    best: tuple[float, QuantizedWeight] | None = None
    rows_per_chunk = max(1, (1 << 23) // (len(shrink_factors) * k))
    for name in candidates:
        fmt = get_format(name)
        chunk_err, chunk_scale, chunk_zp = [], [], []
        for start in range(0, n, rows_per_chunk):
            rows = w[start : start + rows_per_chunk]
            scale, zp = candidate_params(rows, fmt, factors, w if granularity == "tensor" else None)
            d = fake_quantize_weight(rows[None], fmt, scale, zp) - rows[None]  # (F, r, K)
            chunk_err.append(((d @ h) * d).sum(-1))  # (F, r)
            chunk_scale.append(scale)
            chunk_zp.append(zp)
        err = torch.cat(chunk_err, dim=1)  # (F, N)
        scale = torch.cat(chunk_scale, dim=1)
        zp = torch.cat(chunk_zp, dim=1) if chunk_zp[0] is not None else None
        if granularity == "tensor":
            pick = int(err.sum(1).argmin())
            s, z = scale[pick, :1], (zp[pick, :1] if zp is not None else None)
            total = float(err[pick].sum())
        else:
            pick = err.argmin(0)  # first minimum: the plain absmax factor wins ties
            cols = torch.arange(n, device=w.device)
            s, z = scale[pick, cols], (zp[pick, cols] if zp is not None else None)
            total = float(err[pick, cols].sum())
        errors[name] = total / energy
        if best is None or total < best[0]:
            best = (total, QuantizedWeight(fmt, encode_weight(w, fmt, s, z), s, z))
    return best[1], errors


def search_activation(
    stats: LayerStats,
    w_hat: torch.Tensor,
    candidates: tuple[str, ...],
    *,
    shrink_factors: tuple[float, ...],
) -> tuple[str, float, float | None, dict[str, float]]:
    """Pick the activation format and static scale minimising ``|| Q(X) W^T - X W^T ||``.

    Args:
        stats: the layer's input statistics.
        w_hat: the layer's (already quantized) weight as ``(N, K)`` fp32.
        candidates: activation formats to try.
        shrink_factors: clipping factors of the observed range.

    Returns:
        ``(format name, scale, zero point, relative error per format)``.
    """
    if stats.rows is None:  # no rows (grouped conv): symmetric absmax of the first candidate
        fmt = candidates[0]
        scale, zp = activation_params(fmt, stats.amax if fmt == "int8" else max(abs(stats.amin), abs(stats.amax)), stats.amin)
        return fmt, scale, zp, {}
    x = stats.rows
    target = x @ w_hat.T
    energy = float(target.pow(2).sum()) or 1.0
    absmax = max(abs(stats.amin), abs(stats.amax))
    # Observers proposing clipping ranges: the absmax observer shrunk by each factor, and percentile observers of
    # |x| (robust to a few outliers that a factor grid cannot reach). The layer-output error decides among them.
    magnitudes = x.abs().flatten()
    if magnitudes.numel() > 1 << 24:  # torch.quantile's input limit; a strided subsample keeps the tail estimate
        magnitudes = magnitudes[:: magnitudes.numel() // (1 << 24) + 1]
    percentiles = [float(v) for v in torch.quantile(magnitudes, torch.tensor(PERCENTILES, device=x.device))]
    best = None
    errors = {}
    for name in candidates:
        fmt = get_format(name)
        fmt_best = None
        ranges = [(f * stats.amin, f * stats.amax, f * absmax) for f in shrink_factors]
        if fmt.kind == "fp":
            ranges += [(-p, p, p) for p in percentiles if 0 < p < absmax]
        for lo, hi, mag in ranges:
            if fmt.kind == "fp":
                scale, zp = activation_params(fmt, mag)
            else:
                scale, zp = activation_params(fmt, hi, lo)
            s = torch.tensor(scale, device=x.device)
            z = torch.tensor(zp, device=x.device) if zp is not None else None
            x_hat = fake_quantize_activation(x, fmt, s, z) * s
            err = float((x_hat @ w_hat.T - target).pow(2).sum())
            if fmt_best is None or err < fmt_best[0]:
                fmt_best = (err, scale, zp)
        errors[name] = fmt_best[0] / energy
        if best is None or fmt_best[0] < best[0]:
            best = (fmt_best[0], name, fmt_best[1], fmt_best[2])
    return best[1], best[2], best[3], errors
