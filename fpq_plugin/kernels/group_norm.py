"""GroupNorm of a contiguous NCHW bf16/fp16 tensor in two Triton passes, with the PyTorch reference.

Why: PyTorch's CUDA GroupNorm reduces each (image, group) row in one thread block, so an SDXL ResNet GroupNorm
(batch 2, 32 groups: 64 rows of 164 k elements) keeps 64 of an H200's 132 SMs busy and takes ~66 us for its
statistics, about 10x what reading the 21 MB needs; over SDXL's 46 GroupNorms that is 3.0 ms of a 36 ms forward
(``benchmarks/NOTES_GPU.md``). In an NCHW tensor a group's channels are one contiguous run, so the reduction splits
into chunks:

1. ``_moments_kernel``: per chunk of a row, the fp32 mean and the sum of squared deviations (M2) of its elements;
2. ``_apply_kernel``: each program merges its row's chunk statistics (Chan et al.'s pairwise formula, stable for
   any chunk count), then writes ``x * a + b`` with ``a = rstd * gamma[c]`` and ``b = beta[c] - mean * a`` in fp32,
   rounded once to the input dtype, as PyTorch's kernel does.

Agreement with ``F.group_norm``: PyTorch keeps the mean and rstd in the input's dtype when the affine parameters
have it (a bf16 model: statistics rounded to bf16 before they scale anything), and so does this kernel
(``ROUND_STATS``); both then compute in fp32, summing in different orders, so the statistics differ in the last
fp32 bits and a small share of outputs round to the neighbouring bf16/fp16 value.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fpq_plugin.kernels import qops
from fpq_plugin.kernels.backend import _triton_ok

__all__ = ["group_norm", "group_norm_reference", "group_norm_supported"]


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Definition of :func:`group_norm`: ``torch.nn.functional.group_norm``."""
    return F.group_norm(x, num_groups, weight, bias, eps)


def group_norm_supported(x: torch.Tensor, num_groups: int) -> bool:
    """Whether :func:`group_norm` can run ``x`` (contiguous CUDA bf16/fp16, 3-d or more, channels divisible)."""
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.dim() >= 3
        and x.shape[1] % num_groups == 0
        and x.is_contiguous()
        and _triton_ok()
    )


tl = None  # triton.language, bound by _kernels()


def _moments_kernel(x_ptr, mean_ptr, m2_ptr, L, NCHUNK, BLOCK: tl.constexpr):
    """Chunk program_id(1) of row program_id(0): its mean and M2 (fp32) into [row * NCHUNK + chunk]."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    x = tl.load(x_ptr + row * L + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.minimum(L - chunk * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(x, axis=0) / n
    d = tl.where(mask, x - mean, 0.0)
    tl.store(mean_ptr + row * NCHUNK + chunk, mean)
    tl.store(m2_ptr + row * NCHUNK + chunk, tl.sum(d * d, axis=0))


def _apply_kernel(x_ptr, y_ptr, mean_ptr, m2_ptr, w_ptr, b_ptr, L, NCHUNK, CPG, HW, G, eps,
                  HAS_AFFINE: tl.constexpr, ROUND_STATS: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
                  STAT_BLOCK: tl.constexpr):
    """Columns program_id(1)*BLOCK.. of row program_id(0) = image * G + group; CHUNKS = the moments' chunk size."""
    row = tl.program_id(0).to(tl.int64)
    ci = tl.arange(0, STAT_BLOCK)
    cmask = ci < NCHUNK
    cmean = tl.load(mean_ptr + row * NCHUNK + ci, mask=cmask, other=0.0)
    cm2 = tl.load(m2_ptr + row * NCHUNK + ci, mask=cmask, other=0.0)
    cn = tl.where(cmask, tl.minimum(L - ci * CHUNKS, CHUNKS).to(tl.float32), 0.0)
    total = tl.sum(cn, axis=0)
    mean = tl.sum(cn * cmean, axis=0) / total
    dm = tl.where(cmask, cmean - mean, 0.0)
    m2 = tl.sum(cm2, axis=0) + tl.sum(cn * dm * dm, axis=0)
    rstd = 1.0 / tl.sqrt_rn(m2 / total + eps)
    if ROUND_STATS:  # what PyTorch stores them as (the input's dtype), before it uses them
        mean = mean.to(y_ptr.dtype.element_ty).to(tl.float32)
        rstd = rstd.to(y_ptr.dtype.element_ty).to(tl.float32)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    x = tl.load(x_ptr + row * L + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_AFFINE:
        c = (row % G) * CPG + offs // HW
        a = rstd * tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32) - mean * a
    else:
        a = rstd
        b = -mean * rstd
    tl.store(y_ptr + row * L + offs, (x * a + b).to(y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _kernels():
    global tl, _moments_kernel, _apply_kernel
    import triton
    import triton.language

    tl = triton.language
    _moments_kernel = triton.jit(_moments_kernel)
    _apply_kernel = triton.jit(_apply_kernel)
    return triton, _moments_kernel, _apply_kernel


_CHUNK, _CHUNK_WARPS = 4096, 8  # elements per moments program (16 per thread)
_APPLY_BLOCK, _APPLY_WARPS = 2048, 4


_LAUNCHES = qops.CallSiteLaunches()


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Triton version of :func:`group_norm_reference` for a contiguous CUDA ``x`` of shape ``(N, C, *)``; a repeat
    call with the same shape, dtypes and alignment goes through the cached launches."""
    if not (x.is_cuda or qops._interpreting()):
        raise RuntimeError(f"fpq's GroupNorm kernel needs a CUDA tensor, got one on {x.device}")
    if x.dim() < 3 or x.shape[1] % num_groups:
        raise ValueError(f"GroupNorm({num_groups}) needs (N, C, *) with C divisible by it, got {tuple(x.shape)}")
    if not x.is_contiguous():
        x = x.contiguous()
    affine = weight is not None
    key = (x.shape, x.dtype, x.device.index, x.data_ptr() % 16, num_groups, eps, qops.tensor_key(weight),
           qops.tensor_key(bias))
    w = weight if affine else x
    b = bias if bias is not None else (torch.zeros_like(weight) if affine else x)
    hit = _LAUNCHES.get(key)
    if hit is not None:
        moments, apply, n_stats, ints = hit
        y = torch.empty_like(x)
        mean = torch.empty(n_stats, dtype=torch.float32, device=x.device)
        m2 = torch.empty_like(mean)
        dev = x.device.index
        moments(dev, x, mean, m2, ints[0], ints[1])
        apply(dev, x, y, mean, m2, w, b, *ints, float(eps))
        return y
    n, c = x.shape[:2]
    hw = x[0, 0].numel()
    cpg = c // num_groups
    length = cpg * hw
    rows = n * num_groups
    y = torch.empty_like(x)
    if not (rows and length):
        return y
    triton, mk, ak = _kernels()
    nchunk = triton.cdiv(length, _CHUNK)
    mean = torch.empty(rows * nchunk, dtype=torch.float32, device=x.device)
    m2 = torch.empty_like(mean)
    grid_m, consts_m = (rows, nchunk), dict(BLOCK=_CHUNK)
    ck_m = qops._fast_launch(mk, grid_m, (x, mean, m2, length, nchunk), consts_m, _CHUNK_WARPS)
    # PyTorch's native_group_norm returns mean/rstd in x's dtype unless the parameters are of another (mixed) dtype
    round_stats = weight is None or weight.dtype == x.dtype
    grid_a = (rows, triton.cdiv(length, _APPLY_BLOCK))
    consts_a = dict(HAS_AFFINE=affine, ROUND_STATS=round_stats, BLOCK=_APPLY_BLOCK, CHUNKS=_CHUNK,
                    STAT_BLOCK=max(16, triton.next_power_of_2(nchunk)))
    ints = (length, nchunk, cpg, hw, num_groups)
    ck_a = qops._fast_launch(ak, grid_a, (x, y, mean, m2, w, b, *ints, float(eps)), consts_a, _APPLY_WARPS)
    _LAUNCHES.remember(key, (ck_m, ck_a), (grid_m, grid_a), (consts_m, consts_a), (rows * nchunk, ints))
    return y
