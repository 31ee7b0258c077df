"""Quantized Conv2d on the FP8 tensor cores as an implicit GEMM, with the static activation cast fused in.

Semantics (``fp8_conv2d_reference`` is the definition; the Triton kernel must match it up to fp32 summation
order), the convolution analogue of :mod:`fpq_plugin.kernels.fp8_linear`::

    q = (x.float() * (1 / x_scale)).clamp(-fmax, fmax).to(act_dtype)          round-to-nearest-even
    y = conv2d(q.float(), W, stride, padding, dilation) * (x_scale * w_scale[n]) + bias[n]
    y = y.to(out_dtype or x.dtype)

``W`` comes from canonical uint8 codes ``(N, C * KH * KW)`` (PyTorch's weight flattened in (c, kh, kw) order;
8-bit: float8_e4m3fn bit patterns; 4-bit: packed nibbles through a 16-entry table of e4m3-exact values), one
group only (every Stable Diffusion convolution).

The kernel treats the convolution as a GEMM of M = B * Ho * Wo output pixels by N = Cout channels over
K = KH * KW * C, without materialising the im2col matrix: for each tap (r, s) of the filter it gathers the input
pixels that tap reads for BLOCK_M output pixels, BLOCK_K channels at a time (zero where the tap falls in the
padding, which quantizes to zero exactly), converts them to fp8 in registers with the static scale, and multiplies
them with the matching (BLOCK_K, BLOCK_N) slice of the weight. ``prepare_conv_weight`` reorders the weight once to
(N, KH, KW, C) so that slice is contiguous; 4-bit weights are decoded to e4m3 codes there (the kernel reads 8-bit
B tiles; the layer's storage stays 4-bit, the prepared copy is transient per layer and device). Input and output
are addressed through their strides, so NCHW and channels-last tensors both work without a copy; channels-last
gives contiguous channel loads (coalesced A tiles) and is the layout to use for speed. The output keeps the
input's memory format. Triton is imported on the first kernel call only.

Status: tested against the reference on the GPU and measured per shape (H200, 0.54-0.58x of cuDNN's bf16
channels-last convs summed over a UNet, 1.5-2.3x faster than the decode path; ``benchmarks/results/conv_kernels_h200.json``);
inside the UNet it only draws level with decode, so the ``fp8`` backend uses it only with
``FP8_CONV_METHOD = "implicit_gemm"`` (see :mod:`fpq_plugin.kernels.backend`).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from fpq_plugin.kernels import fp8_linear as fl

__all__ = ["PreparedConvWeight", "fp8_conv2d", "fp8_conv2d_reference", "prepare_conv_weight"]

E4M3 = torch.float8_e4m3fn


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def fp8_conv2d_reference(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    kernel_size: tuple[int, int],
    w_scale: torch.Tensor,
    x_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    weight_table: torch.Tensor | None = None,
    act_dtype: torch.dtype = E4M3,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The definition of the quantized Conv2d (see the module docstring). Pure PyTorch, any device."""
    kh, kw = _pair(kernel_size)
    c = x.shape[1]
    w = fl.dequantize_weight(w_codes, c * kh * kw, weight_table).reshape(-1, c, kh, kw)
    xs = torch.as_tensor(x_scale, dtype=torch.float32, device=x.device)
    q = fl.quantize_activation_reference(x, xs, act_dtype)
    y = F.conv2d(q.float(), w, None, _pair(stride), _pair(padding), _pair(dilation))
    y = y * (xs * w_scale.to(device=x.device, dtype=torch.float32)).reshape(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.float().reshape(1, -1, 1, 1)
    return y.to(out_dtype or x.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedConvWeight:
    """A convolution's weight as the kernel reads it: ``codes`` uint8 ``(N, KH * KW * C)``, e4m3 bit patterns in
    (kh, kw, c) order (one output channel per row, each filter tap's channels contiguous)."""

    codes: torch.Tensor
    n: int
    c: int
    kh: int
    kw: int


def prepare_conv_weight(
    w_codes: torch.Tensor, in_channels: int, kernel_size, weight_table: torch.Tensor | None = None
) -> PreparedConvWeight:
    """Reorder canonical codes to (N, KH, KW, C) and decode 4-bit codes to e4m3 bit patterns. Once per layer."""
    kh, kw = _pair(kernel_size)
    k = in_channels * kh * kw
    if w_codes.dtype != torch.uint8 or w_codes.dim() != 2:
        raise ValueError(f"w_codes must be a 2-D uint8 tensor, got {w_codes.dtype} of shape {tuple(w_codes.shape)}")
    if weight_table is not None:
        lut = torch.tensor(fl.weight_table_to_e4m3_bits(weight_table), dtype=torch.uint8, device=w_codes.device)
        codes = lut[fl.unpack_nibbles(w_codes, k).long()]
    else:
        codes = w_codes
    if codes.shape[1] != k:
        raise ValueError(f"weights have {codes.shape[1]} codes per row; C={in_channels} x {kh}x{kw} needs {k}")
    n = codes.shape[0]
    ordered = codes.reshape(n, in_channels, kh, kw).permute(0, 2, 3, 1).reshape(n, k).contiguous()
    return PreparedConvWeight(ordered, n, in_channels, kh, kw)


# The jit function below is plain Python until _kernels() wraps it; `tl` and fp8_linear's jit helpers are bound
# then (the activation cast is fp8_linear's, so both kernels round identically).
tl = None
_to_fp8 = None
_tile_of_program = None


def _fp8_conv_kernel(
    x_ptr, w_ptr, ws_ptr, xs_ptr, b_ptr, y_ptr,
    M, N, C, H, W, HO, WO,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, ACT_E5M2: tl.constexpr, CLAMP: tl.constexpr, FMAX: tl.constexpr,
    WS_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    rn = offs_n % N  # columns past the end re-read valid weights; only the store is masked
    # output pixel of each row: (batch, ho, wo)
    hw = HO * WO
    bi = offs_m // hw
    rem = offs_m % hw
    ho = rem // WO
    wo = rem % WO
    x_base = bi.to(tl.int64) * sxb
    k_total = KH * KW * C

    xs = tl.load(xs_ptr)
    inv = tl.math.div_rn(1.0, xs)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in tl.static_range(KH):
        hi = ho * stride_h - pad_h + r * dil_h
        h_ok = m_ok & (hi >= 0) & (hi < H)
        for s in tl.static_range(KW):
            wi = wo * stride_w - pad_w + s * dil_w
            ok = h_ok & (wi >= 0) & (wi < W)
            pix = x_base + hi.to(tl.int64) * sxh + wi.to(tl.int64) * sxw
            tap = (r * KW + s) * C
            for c0 in range(0, C, BLOCK_K):
                ch = c0 + offs_k
                c_ok = ch < C
                a = tl.load(x_ptr + pix[:, None] + ch[None, :].to(tl.int64) * sxc,
                            mask=ok[:, None] & c_ok[None, :], other=0.0)
                a8 = _to_fp8(a, inv, CLAMP, FMAX, ACT_E5M2)
                b = tl.load(w_ptr + rn[None, :].to(tl.int64) * k_total + (tap + ch)[:, None],
                            mask=c_ok[:, None], other=0)
                acc = tl.dot(a8, b.to(tl.float8e4nv, bitcast=True), acc)

    n_mask = offs_n < N
    if WS_PER_CHANNEL:
        ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
        out = acc * (xs * ws)[None, :]
    else:
        out = acc * (xs * tl.load(ws_ptr))
    if HAS_BIAS:
        out = out + tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_off = (bi.to(tl.int64) * syb + ho.to(tl.int64) * syh + wo.to(tl.int64) * syw)[:, None] \
        + offs_n[None, :].to(tl.int64) * syc
    tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_mask[None, :])


@functools.cache
def _kernels():
    global tl, _to_fp8, _tile_of_program, _fp8_conv_kernel
    triton, _, _ = fl._kernels()  # binds fp8_linear's jit helpers
    tl = triton.language
    _to_fp8, _tile_of_program = fl._to_fp8, fl._tile_of_program
    _fp8_conv_kernel = triton.jit(_fp8_conv_kernel, do_not_specialize=["M"])
    return triton, _fp8_conv_kernel


def default_conv_config(m: int, n: int, c: int, taps: int = 9) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for an M x N GEMM over ``taps`` x C.

    From the per-shape search on an H200 (benchmarks/results/conv_kernels_h200.json, every conv of SD1.5 and SDXL
    at batch 2): few output pixels want small tiles (enough programs to fill the SMs), many pixels with 3x3
    filters want 128x256 tiles (each gathered and converted A tile is reused over more output channels).
    """
    bk = 128 if c >= 128 else (64 if c >= 64 else 32)
    if m <= 256:
        return (64, 64, min(bk, 64), 8, 4, 3)
    if n <= 64:
        return (128, 64, min(bk, 64), 8, 4, 3)
    if m <= 2048 or (taps == 1 and m <= 8192):
        return (64, 128, bk, 8, 4, 3)
    if taps == 1:
        return (128, 128, min(bk, 64), 8, 8, 3)
    return (128, 256, min(bk, 64), 8, 8, 3)


def fp8_conv2d(
    x: torch.Tensor,
    w: PreparedConvWeight,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    act_dtype: torch.dtype = E4M3,
    out_dtype: torch.dtype | None = None,
    out_memory_format: torch.memory_format | None = None,
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Fused quantized Conv2d on a CUDA sm_89+ GPU (or the Triton interpreter); the result of
    :func:`fp8_conv2d_reference` for the unprepared codes. ``x`` is (B, C, H, W) bf16/fp16/fp32, any strides; the
    output is channels-last when ``x`` is, unless ``out_memory_format`` says otherwise."""
    fl._check_device(x, "fp8_conv2d")
    if x.dim() != 4 or x.shape[1] != w.c:
        raise ValueError(f"x must be (B, {w.c}, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    dev = x.device
    if w.codes.device != dev:
        raise ValueError(f"weights are on {w.codes.device}, x on {dev}")
    w_scale = fl._as_scale(w_scale, dev, "w_scale").reshape(-1).contiguous()
    if w_scale.numel() not in (1, w.n):
        raise ValueError(f"w_scale must have 1 or N={w.n} elements, got {w_scale.numel()}")
    x_scale = fl._as_scale(x_scale, dev, "x_scale")
    if x_scale.numel() != 1:
        raise ValueError(f"x_scale must be a single static scale (0-d), got shape {tuple(x_scale.shape)}")
    if bias is not None:
        if bias.numel() != w.n:
            raise ValueError(f"bias must have N={w.n} elements, got {bias.numel()}")
        bias = bias.reshape(-1).contiguous()
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    b, c, h, wd = x.shape
    ho, wo = _out_size(h, w.kh, sh, ph, dh), _out_size(wd, w.kw, sw, pw, dw)
    channels_last = c > 1 and x.is_contiguous(memory_format=torch.channels_last)
    fmt = out_memory_format or (torch.channels_last if channels_last else torch.contiguous_format)
    y = torch.empty((b, w.n, max(ho, 0), max(wo, 0)), dtype=out_dtype or x.dtype, device=dev, memory_format=fmt)
    m = b * ho * wo
    if m <= 0 or w.n == 0:
        return y
    bm, bn, bk, gm, nw, ns = config or default_conv_config(m, w.n, c, w.kh * w.kw)
    triton, kern = _kernels()
    grid = (triton.cdiv(m, bm) * triton.cdiv(w.n, bn),)
    interp = fl._interpreting()
    kern[grid](
        x, w.codes, w_scale, x_scale, bias if bias is not None else w_scale, y,
        m, w.n, c, h, wd, ho, wo, *x.stride(), *y.stride(), sh, sw, ph, pw, dh, dw,
        KH=w.kh, KW=w.kw, ACT_E5M2=act_dtype == torch.float8_e5m2, CLAMP=interp, FMAX=fl._fmax(act_dtype),
        WS_PER_CHANNEL=w_scale.numel() != 1, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=nw, num_stages=ns,
    )
    return y
