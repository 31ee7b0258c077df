"""GEGLU in one pass: ``h * gelu(gate)`` of a projection output's two halves, with a pure-PyTorch reference.

Why: diffusers' and ComfyUI's GEGLU compute ``h, gate = y.chunk(2, -1); h * F.gelu(gate)``. Both halves are strided
views (rows 2F apart), so PyTorch runs the GELU and the product through its generic, non-vectorised elementwise
kernel, and writes the GELU to memory in between: on an H200 that was 5.2 ms of SDXL's 41 ms UNet forward (batch 2,
1024x1024) in bf16 and in fpq alike (``benchmarks/NOTES_GPU.md``). This kernel reads each row once and writes the
product once.

Arithmetic as PyTorch's bf16/fp16 CUDA path: the GELU is computed in fp32 with ``erf`` and rounded to the input
dtype, then multiplied in fp32 by ``h`` and rounded again (PyTorch materialises the GELU in the input dtype). Not bit
for bit: Triton's ``erf`` (libdevice) and the one PyTorch is compiled with differ by an fp32 ulp for some inputs
(measured on an H200: 9% of fp32 GELUs, 1.4% after rounding to bf16, each by one ulp of the GELU), so the two
results agree to two roundings of the output dtype.

:func:`geglu_and_cast` also writes the product's FP8 activation cast for the Linear that reads it next
(``ff.net.2``), saving that Linear's separate cast pass (a re-read of the whole tensor and a launch): the cast is
computed from the rounded product exactly as :func:`fpq_plugin.kernels.qops.quantize_fp8` computes it, so the
consumer sees the same bits it would have made itself.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fpq_plugin.kernels import qops
from fpq_plugin.kernels.backend import _triton_ok

__all__ = ["geglu", "geglu_and_cast", "geglu_and_cast_reference", "geglu_reference", "geglu_supported"]


def geglu_reference(y: torch.Tensor) -> torch.Tensor:
    """Definition of :func:`geglu`: ``h * gelu(gate)`` with ``h, gate = y.chunk(2, dim=-1)``."""
    h, gate = y.chunk(2, dim=-1)
    return h * F.gelu(gate)


def geglu_and_cast_reference(y: torch.Tensor, x_scale: torch.Tensor, act_dtype=torch.float8_e4m3fn):
    """Definition of :func:`geglu_and_cast`: the GEGLU and ``quantize_fp8_reference`` of it (of the rounded output)."""
    out = geglu_reference(y)
    return out, qops.quantize_fp8_reference(out, x_scale, act_dtype)


def geglu_supported(x: torch.Tensor) -> bool:
    """Whether :func:`geglu` can run on a tensor like ``x`` (a CUDA bf16/fp16 tensor, Triton importable)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _triton_ok()


tl = _cast_fp8 = None  # triton.language and qops' fp8 conversion, bound by _kernel()


def _geglu_kernel(y_ptr, o_ptr, q_ptr, xs_ptr, HALF, WRITE_Q: tl.constexpr, CLAMP: tl.constexpr,
                  FMAX: tl.constexpr, ACT_E5M2: tl.constexpr, BLOCK: tl.constexpr):
    """Row program_id(0), columns program_id(1)*BLOCK..: o[r, c] = y[r, c] * gelu(y[r, HALF + c]); WRITE_Q: also
    q[r, c] = fp8(o[r, c] / xs), the activation cast of qops' ``_quant_kernel`` applied to the stored o."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < HALF
    src = y_ptr + row * (2 * HALF)
    h = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(src + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    gelu = g * 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
    gelu = gelu.to(o_ptr.dtype.element_ty).to(tl.float32)  # PyTorch stores the GELU in the input dtype
    out = (h * gelu).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + row * HALF + cols, out, mask=mask)
    if WRITE_Q:
        inv = tl.math.div_rn(1.0, tl.load(xs_ptr))
        tl.store(q_ptr + row * HALF + cols, _cast_fp8(out, inv, CLAMP, FMAX, ACT_E5M2), mask=mask)


@functools.cache
def _kernel():
    global _geglu_kernel
    triton, _geglu_kernel = qops.jit_cast_writer(_geglu_kernel)
    return triton, _geglu_kernel


_BLOCK, _WARPS = 1024, 4


def geglu(y: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`geglu_reference` for a CUDA ``y`` whose last dimension (even, 2F) is dense.

    Returns a new contiguous ``(..., F)`` tensor of ``y``'s dtype; repeat calls go through qops' cached launch.
    """
    return _launch(y, None, None)[0]


def geglu_and_cast(y: torch.Tensor, x_scale: torch.Tensor, act_dtype=torch.float8_e4m3fn):
    """Triton version of :func:`geglu_and_cast_reference`: ``(out, q)``, both contiguous ``(..., F)``, ``q`` of
    ``act_dtype``, in one pass over ``y``. ``x_scale``: the one-element fp32 scale of the consumer's input."""
    qops.check_cast_scale(x_scale, act_dtype, y.device, "GEGLU")
    return _launch(y, x_scale, act_dtype)


_LAUNCHES = qops.CallSiteLaunches()


def _launch(y: torch.Tensor, x_scale, act_dtype):
    if not (y.is_cuda or qops._interpreting()):
        raise RuntimeError(f"fpq's GEGLU kernel needs a CUDA tensor, got one on {y.device}")
    two_f = y.shape[-1]
    if two_f % 2:
        raise ValueError(f"GEGLU needs an even last dimension (two halves), got shape {tuple(y.shape)}")
    if not y.is_contiguous():
        y = y.contiguous()
    f = two_f // 2
    out = torch.empty((*y.shape[:-1], f), dtype=y.dtype, device=y.device)
    write_q = act_dtype is not None
    q = torch.empty(out.shape, dtype=act_dtype, device=y.device) if write_q else None
    # without the cast, out and y stand in for the unused q and scale pointers
    key = (y.shape, y.dtype, y.device.index, y.data_ptr() % 16, act_dtype,
           x_scale.data_ptr() % 16 if write_q else None)
    hit = _LAUNCHES.get(key)
    if hit is not None:
        hit[0](y.device.index, *((y, out, q, x_scale, f) if write_q else (y, out, out, y, f)))
        return out, q
    rows = y.numel() // two_f if two_f else 0
    if rows and f:
        triton, kern = _kernel()
        consts = dict(WRITE_Q=write_q, CLAMP=qops._interpreting(), FMAX=qops._FMAX[act_dtype] if write_q else 0.0,
                      ACT_E5M2=act_dtype == torch.float8_e5m2, BLOCK=_BLOCK)
        args = (y, out, q, x_scale, f) if write_q else (y, out, out, y, f)
        grid = (rows, triton.cdiv(f, _BLOCK))
        ck = qops._fast_launch(kern, grid, args, consts, _WARPS)
        _LAUNCHES.remember(key, (ck,), (grid,), (consts,))
    return out, q
