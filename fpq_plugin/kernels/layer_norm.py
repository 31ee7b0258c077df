"""LayerNorm over the last dimension of a bf16/fp16 tensor in one Triton pass, with the PyTorch reference.

Why: a transformer block's three LayerNorms feed quantized Linears (``attn1.to_q``/``to_k``/``to_v``, ``attn2.to_q``,
``ff``'s GEGLU projection). PyTorch's CUDA LayerNorm took 1.9 ms of SDXL's W8A8 forward (batch 2, 1024x1024, 210
calls on an H200), about 3.5x what reading and writing the tensors needs, and each output was then read again by a
separate FP8 activation cast (``benchmarks/NOTES_GPU.md``). :func:`layer_norm_and_cast` writes the normalised
tensor and, beside it, its FP8 cast for the Linear that reads it next, so that cast pass disappears.

Arithmetic: per row, fp32 mean and variance (two-pass over registers: the mean, then the mean of squared deviations),
``rstd = rsqrt(var + eps)``, ``y = (x - mean) * rstd * weight + bias`` in fp32, rounded once to the input dtype.
PyTorch sums in another order (Welford), so the statistics differ in their last fp32 bits and a small share of
outputs round to the neighbouring bf16/fp16 value: the two agree within one rounding of the output dtype plus a few
fp32 ulps of the normalised value. The FP8 cast is computed from the rounded output exactly as
:func:`fpq_plugin.kernels.qops.quantize_fp8` computes it (the consumer sees the bits it would have made itself).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fpq_plugin.kernels import qops
from fpq_plugin.kernels.backend import _triton_ok

__all__ = ["layer_norm", "layer_norm_and_cast", "layer_norm_and_cast_reference", "layer_norm_reference",
           "layer_norm_supported"]

# Widest row one program holds in registers (SD/SDXL: 320-1280).
MAX_C = 8192


def layer_norm_reference(x, weight=None, bias=None, eps=1e-5):
    """Definition of :func:`layer_norm`: ``F.layer_norm`` over the last dimension."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm_and_cast_reference(x, weight, bias, eps, x_scale, act_dtype=torch.float8_e4m3fn):
    """Definition of :func:`layer_norm_and_cast`: the LayerNorm and ``quantize_fp8_reference`` of its output."""
    out = layer_norm_reference(x, weight, bias, eps)
    return out, qops.quantize_fp8_reference(out, x_scale, act_dtype)


def layer_norm_supported(x: torch.Tensor, normalized_shape) -> bool:
    """Whether :func:`layer_norm` can run ``x`` normalised over ``normalized_shape`` (its last dimension only; CUDA
    bf16/fp16; rows up to :data:`MAX_C` wide). Any layout: a non-contiguous ``x`` is copied first, as PyTorch's
    LayerNorm copies it too. (SD1.5's transformer blocks get exactly that: ``proj_in`` is a 1x1 conv whose NCHW
    output is permuted and reshaped to ``(B, HW, C)`` as a view with the channels HW apart, so norm1 sees a
    transposed tensor; refusing those left norm1 of every block on PyTorch's kernel, without the consumer's cast.)"""
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and len(normalized_shape) == 1
        and x.dim() >= 1
        and x.shape[-1] == normalized_shape[0]
        and 0 < x.shape[-1] <= MAX_C
        and _triton_ok()
    )


tl = _cast_fp8 = None  # triton.language and qops' fp8 conversion, bound by _kernel()


def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, o_ptr, q_ptr, xs_ptr, ROWS, C, eps,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, WRITE_Q: tl.constexpr, CLAMP: tl.constexpr,
                       FMAX: tl.constexpr, ACT_E5M2: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_PER: tl.constexpr):
    """Rows program_id(0)*ROWS_PER.. (each C wide, BLOCK_C >= C): o = LayerNorm(x); WRITE_Q: q = fp8(o / xs)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS_PER + tl.arange(0, ROWS_PER)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < ROWS)[:, None] & col_ok[None, :]
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    d = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / C
    rstd = tl.math.rsqrt(var + eps)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = y.to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + offs, out, mask=mask)
    if WRITE_Q:
        inv = tl.math.div_rn(1.0, tl.load(xs_ptr))
        tl.store(q_ptr + offs, _cast_fp8(out, inv, CLAMP, FMAX, ACT_E5M2), mask=mask)


@functools.cache
def _kernel():
    global _layer_norm_kernel
    triton, _layer_norm_kernel = qops.jit_cast_writer(_layer_norm_kernel)
    return triton, _layer_norm_kernel


def layer_norm(x: torch.Tensor, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """Triton version of :func:`layer_norm_reference` for a CUDA ``x`` (see :func:`layer_norm_supported`): a new
    contiguous tensor of ``x``'s shape and dtype; repeat calls go through qops' cached launch."""
    return _launch(x, weight, bias, eps, None, None)[0]


def layer_norm_and_cast(x, weight, bias, eps: float, x_scale: torch.Tensor, act_dtype=torch.float8_e4m3fn):
    """Triton version of :func:`layer_norm_and_cast_reference`: ``(out, q)`` of ``x``'s shape, ``q`` of
    ``act_dtype``, in one pass over ``x``. ``x_scale``: the one-element fp32 scale of the consumer's input."""
    qops.check_cast_scale(x_scale, act_dtype, x.device, "LayerNorm")
    return _launch(x, weight, bias, eps, x_scale, act_dtype)


_LAUNCHES = qops.CallSiteLaunches()


def _launch(x, weight, bias, eps, x_scale, act_dtype):
    if not (x.is_cuda or qops._interpreting()):
        raise RuntimeError(f"fpq's LayerNorm kernel needs a CUDA tensor, got one on {x.device}")
    c = x.shape[-1] if x.dim() else 0
    if not 0 < c <= MAX_C:
        raise ValueError(f"LayerNorm kernel: rows must be 1..{MAX_C} wide, got shape {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != (c,) or p.device != x.device):
            raise ValueError(f"LayerNorm kernel: {name} must be ({c},) on {x.device}, got {tuple(p.shape)} on "
                             f"{p.device}")
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty_like(x)
    write_q = act_dtype is not None
    q = torch.empty(x.shape, dtype=act_dtype, device=x.device) if write_q else None
    # unused pointers get x or out as stand-ins
    w, b, qo, xs = (weight if weight is not None else x, bias if bias is not None else x, q if write_q else out,
                    x_scale if write_q else x)
    key = (x.shape, x.dtype, x.device.index, x.data_ptr() % 16, qops.tensor_key(weight), qops.tensor_key(bias), eps,
           act_dtype, qops.tensor_key(x_scale) if write_q else None)
    hit = _LAUNCHES.get(key)
    if hit is not None:
        launch, rows = hit
        launch(x.device.index, x, w, b, out, qo, xs, rows, c, float(eps))
        return out, q
    rows = x.numel() // c
    if rows:
        triton, kern = _kernel()
        block_c = triton.next_power_of_2(c)
        rows_per = max(1, 4096 // block_c)
        consts = dict(HAS_W=weight is not None, HAS_B=bias is not None, WRITE_Q=write_q, CLAMP=qops._interpreting(),
                      FMAX=qops._FMAX[act_dtype] if write_q else 0.0, ACT_E5M2=act_dtype == torch.float8_e5m2,
                      BLOCK_C=block_c, ROWS_PER=rows_per)
        grid = (triton.cdiv(rows, rows_per),)
        ck = qops._fast_launch(kern, grid, (x, w, b, out, qo, xs, rows, c, float(eps)), consts,
                               4 if block_c * rows_per <= 4096 else 8)
        _LAUNCHES.remember(key, (ck,), (grid,), (consts,), (rows,))
    return out, q
