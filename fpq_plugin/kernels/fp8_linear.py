"""Quantized Linear with a static FP8 activation scale: W8A8 (FP8 weights) and W4A8 (4-bit weights).

Semantics (``fp8_linear_reference`` is the definition; the Triton kernel must match it)::

    inv = 1 / x_scale                                   (fp32, once)
    q   = (x.float() * inv).clamp(-fmax, fmax).to(act_dtype)       round-to-nearest-even
    y   = (q.float() @ W.float().T) * (x_scale * w_scale) + bias   (fp32)
    y   = y.to(out_dtype or x.dtype)

``fmax`` is 448 for float8_e4m3fn and 57344 for float8_e5m2. ``W`` is stored as uint8 codes, canonical layout:

* 8-bit weights (``weight_table is None``): ``(N, K)`` uint8 holding float8_e4m3fn bit patterns.
* 4-bit weights: ``(N, ceil(K/2))`` uint8; byte ``j`` of a row holds element ``2j`` in its low nibble and
  element ``2j+1`` in its high nibble (odd ``K``: the last high nibble is padding code 0). Code ``c`` means
  ``weight_table[c]`` (fp32, 16 entries, every value exactly representable in float8_e4m3fn).

The kernel (``fp8_linear``, CUDA sm_89+) loads the bf16/fp16/fp32 A tile, multiplies by ``inv`` and converts to
fp8 in registers (the same round-to-nearest-even, saturating conversion), so no separate quantize pass ever
touches memory. B tiles are fp8 (8-bit codes reinterpreted) or decoded from packed nibbles through a 16-entry
table of e4m3 bit patterns (two ``prmt`` byte-permutes per 4 codes). ``tl.dot`` accumulates in fp32; the
epilogue applies ``x_scale * w_scale[n]``, adds the bias and casts to the output dtype.

The canonical (N, K) layout is already what an fp8 ``wgmma`` wants for B (K contiguous), so
``prepare_weight`` re-arranges nothing: it validates the codes, makes them contiguous and builds the 4-bit
code -> e4m3 table once. Triton is imported on the first kernel call only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import weakref

import torch

__all__ = [
    "PreparedWeight",
    "default_config",
    "dequantize_weight",
    "fp8_linear",
    "fp8_linear_reference",
    "prepare_weight",
    "quantize_activation",
    "quantize_activation_reference",
    "tune_config",
    "unpack_nibbles",
    "weight_table_to_e4m3_bits",
]

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
_FMAX = {E4M3: 448.0, E5M2: 57344.0}
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _fmax(act_dtype: torch.dtype) -> float:
    try:
        return _FMAX[act_dtype]
    except KeyError:
        raise ValueError(f"act_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {act_dtype}") from None


# ----------------------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, any device)
# ----------------------------------------------------------------------------------------------------------------


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 ``(N, ceil(k/2))`` -> uint8 codes ``(N, k)``: element 2j = low nibble of byte j, 2j+1 = high nibble."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed 4-bit weights must be uint8, got {packed.dtype}")
    if packed.shape[-1] != (k + 1) // 2:
        raise ValueError(f"4-bit weights: {packed.shape[-1]} bytes per row cannot hold K={k} codes")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)[..., :k]


def dequantize_weight(w_codes: torch.Tensor, k: int, weight_table: torch.Tensor | None = None) -> torch.Tensor:
    """The unscaled weight values, fp32 ``(N, k)`` (the ``W`` of the module docstring)."""
    if w_codes.dtype != torch.uint8 or w_codes.dim() != 2:
        raise ValueError(f"w_codes must be a 2-D uint8 tensor, got {w_codes.dtype} of shape {tuple(w_codes.shape)}")
    if weight_table is None:
        if w_codes.shape[1] != k:
            raise ValueError(f"8-bit weights: w_codes has {w_codes.shape[1]} columns, x has K={k}")
        return w_codes.view(E4M3).float()
    table = weight_table.to(device=w_codes.device, dtype=torch.float32).reshape(-1)
    if table.numel() != 16:
        raise ValueError(f"weight_table must have 16 entries, got {table.numel()}")
    return table[unpack_nibbles(w_codes, k).long()]


def quantize_activation_reference(x: torch.Tensor, x_scale: torch.Tensor, act_dtype: torch.dtype = E4M3):
    """``(x.float() * (1 / x_scale)).clamp(-fmax, fmax).to(act_dtype)``: the activation cast of the definition."""
    fmax = _fmax(act_dtype)
    inv = 1.0 / torch.as_tensor(x_scale, dtype=torch.float32, device=x.device)
    return (x.float() * inv).clamp(-fmax, fmax).to(act_dtype)


def fp8_linear_reference(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weight_table: torch.Tensor | None = None,
    act_dtype: torch.dtype = E4M3,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The definition of the quantized Linear (see the module docstring). Pure PyTorch, any device."""
    if isinstance(w_codes, PreparedWeight):
        weight_table = w_codes.table
        w_codes = w_codes.codes
    k = x.shape[-1]
    w = dequantize_weight(w_codes, k, weight_table)
    xs = torch.as_tensor(x_scale, dtype=torch.float32, device=x.device)
    q = quantize_activation_reference(x, xs, act_dtype)
    y = q.float() @ w.t()
    y = y * (xs * w_scale.to(device=x.device, dtype=torch.float32))
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Weight preparation (once per layer, deterministic)
# ----------------------------------------------------------------------------------------------------------------


def weight_table_to_e4m3_bits(weight_table: torch.Tensor) -> tuple[int, ...]:
    """The 16 float8_e4m3fn bit patterns of a 4-bit code table; ``ValueError`` if a value is not exact in e4m3."""
    t = weight_table.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    if t.numel() != 16:
        raise ValueError(f"weight_table must have 16 entries, got {t.numel()}")
    q = t.to(E4M3)
    back = q.float()
    bad = ~((back == t) | (torch.isnan(t) & torch.isnan(back)))
    if bool(bad.any()) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"weight_table values must be finite and exactly representable in float8_e4m3fn: {t.tolist()}")
    return tuple(int(b) for b in q.view(torch.uint8).tolist())


def _signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >= 1 << (bits - 1) else v


@dataclasses.dataclass(frozen=True)
class PreparedWeight:
    """Weights as the kernel consumes them (made once by :func:`prepare_weight`).

    ``codes`` is the canonical uint8 tensor, contiguous: ``(N, K)`` e4m3 bit patterns for 8-bit weights,
    ``(N, ceil(K/2))`` packed nibbles for 4-bit ones. ``lut`` holds the 16 e4m3 bit patterns of the code table
    (4-bit only), ``lut32`` the same as four little-endian int32 words, ``lut64`` as two int64 words.
    """

    codes: torch.Tensor
    bits: int
    n: int
    table: torch.Tensor | None = None
    lut: tuple[int, ...] | None = None
    lut32: tuple[int, int, int, int] = (0, 0, 0, 0)
    lut64: tuple[int, int] = (0, 0)

    def check_k(self, k: int) -> None:
        want = k if self.bits == 8 else (k + 1) // 2
        if self.codes.shape[1] != want:
            raise ValueError(
                f"{self.bits}-bit weights with {self.codes.shape[1]} bytes per row do not fit an input with K={k}"
            )


_LUT_CACHE: "weakref.WeakKeyDictionary[torch.Tensor, tuple[int, tuple[int, ...]]]" = weakref.WeakKeyDictionary()


def _cached_lut(weight_table: torch.Tensor) -> tuple[int, ...]:
    hit = _LUT_CACHE.get(weight_table)
    if hit is not None and hit[0] == weight_table._version:
        return hit[1]
    lut = weight_table_to_e4m3_bits(weight_table)
    _LUT_CACHE[weight_table] = (weight_table._version, lut)
    return lut


def prepare_weight(w_codes: torch.Tensor, weight_table: torch.Tensor | None = None) -> PreparedWeight:
    """Validate canonical uint8 codes and build what the kernel needs. Call once per layer at load time.

    Deterministic; re-arranges nothing (the canonical (N, K) layout is K-major, which is what the fp8 tensor
    cores want for B). For 4-bit weights the code table is turned into 16 e4m3 bit patterns here (a host read of
    16 values, so do it at load time, not per call).
    """
    if isinstance(w_codes, PreparedWeight):
        return w_codes
    if w_codes.dtype != torch.uint8 or w_codes.dim() != 2:
        raise ValueError(f"w_codes must be a 2-D uint8 tensor, got {w_codes.dtype} of shape {tuple(w_codes.shape)}")
    codes = w_codes.contiguous()
    if weight_table is None:
        return PreparedWeight(codes=codes, bits=8, n=codes.shape[0])
    lut = _cached_lut(weight_table)
    w32 = tuple(_signed(sum(lut[4 * j + i] << (8 * i) for i in range(4)), 32) for j in range(4))
    w64 = tuple(_signed(sum(lut[8 * j + i] << (8 * i) for i in range(8)), 64) for j in range(2))
    return PreparedWeight(codes=codes, bits=4, n=codes.shape[0], table=weight_table, lut=lut, lut32=w32, lut64=w64)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (built on first use)
# ----------------------------------------------------------------------------------------------------------------

# For 4 packed bytes w (uint8 x4 in one register) and the code table as four words t0..t3 (byte i of t_j = entry
# 4j+i): $0 byte i = entry[lo nibble of byte i], $1 byte i = entry[hi nibble of byte i]. prmt picks entries 0-7
# from (t0, t1) and 8-15 from (t2, t3) with the 3 low code bits; a sign-replicating prmt turns code bit 3 into a
# byte mask that selects between them.
_LUT_ASM = """
{
.reg .b32 x, y, s, z, m, ra, rb;
and.b32 x, $2, 0x07070707;
shr.u32 y, x, 4;
or.b32 y, y, x;
prmt.b32 s, y, y, 0x0020;
prmt.b32 ra, $3, $7, s;
prmt.b32 rb, $11, $15, s;
shl.b32 z, $2, 4;
prmt.b32 m, z, z, 0xBA98;
and.b32 rb, rb, m;
not.b32 m, m;
and.b32 ra, ra, m;
or.b32 $0, ra, rb;
shr.u32 x, $2, 4;
and.b32 x, x, 0x07070707;
shr.u32 y, x, 4;
or.b32 y, y, x;
prmt.b32 s, y, y, 0x0020;
prmt.b32 ra, $3, $7, s;
prmt.b32 rb, $11, $15, s;
prmt.b32 m, $2, $2, 0xBA98;
and.b32 rb, rb, m;
not.b32 m, m;
and.b32 ra, ra, m;
or.b32 $1, ra, rb;
}
"""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("fp8_linear needs the 'triton' package (pip install triton)") from e

    lut_asm_src = _LUT_ASM

    @triton.jit
    def _lut_asm(p, t0, t1, t2, t3):
        z = tl.zeros(p.shape, tl.int32)
        lo, hi = tl.inline_asm_elementwise(
            lut_asm_src,
            "=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [p, z + t0, z + t1, z + t2, z + t3],
            dtype=(tl.uint8, tl.uint8),
            is_pure=True,
            pack=4,
        )
        return lo, hi

    @triton.jit
    def _lut_portable(p, l0, l1):
        c_lo = (p & 15).to(tl.int64)
        c_hi = (p >> 4).to(tl.int64)
        v_lo = tl.where(c_lo < 8, l0, l1)
        v_hi = tl.where(c_hi < 8, l0, l1)
        lo = ((v_lo >> ((c_lo & 7) * 8)) & 255).to(tl.uint8)
        hi = ((v_hi >> ((c_hi & 7) * 8)) & 255).to(tl.uint8)
        return lo, hi

    @triton.jit
    def _to_fp8(a, inv, CLAMP: tl.constexpr, FMAX: tl.constexpr, ACT_E5M2: tl.constexpr):
        v = a.to(tl.float32) * inv
        if CLAMP:
            v = tl.maximum(v, -FMAX, propagate_nan=tl.PropagateNan.ALL)
            v = tl.minimum(v, FMAX, propagate_nan=tl.PropagateNan.ALL)
        if ACT_E5M2:
            return v.to(tl.float8e5)
        else:
            return v.to(tl.float8e4nv)

    @triton.jit(do_not_specialize=["M", "t0", "t1", "t2", "t3", "l0", "l1"])
    def _fp8_linear_kernel(
        x_ptr, w_ptr, ws_ptr, xs_ptr, b_ptr, y_ptr,
        M, N, K, KP,
        stride_xm, stride_wn, stride_ym,
        t0, t1, t2, t3, l0, l1,
        W4: tl.constexpr, LUT_ASM: tl.constexpr, ACT_E5M2: tl.constexpr, CLAMP: tl.constexpr, FMAX: tl.constexpr,
        WS_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IMPRECISE_ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        HALF_K: tl.constexpr = BLOCK_K // 2
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = offs_m % M  # rows past the end re-read valid rows; only the store is masked
        rn = offs_n % N

        xs = tl.load(xs_ptr)
        inv = tl.math.div_rn(1.0, xs)

        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :]
        if W4:
            offs_kp = tl.arange(0, HALF_K)
            b_ptrs = w_ptr + rn[None, :] * stride_wn + offs_kp[:, None]
        else:
            b_ptrs = w_ptr + rn[None, :] * stride_wn + offs_k[:, None]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_rem = K - kb * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_rem, other=0.0)
                if W4:
                    b = tl.load(b_ptrs, mask=offs_kp[:, None] < KP - kb * HALF_K, other=0)
                else:
                    b = tl.load(b_ptrs, mask=offs_k[:, None] < k_rem, other=0)
            a8 = _to_fp8(a, inv, CLAMP, FMAX, ACT_E5M2)
            if W4:
                if LUT_ASM:
                    b_lo, b_hi = _lut_asm(b, t0, t1, t2, t3)
                else:
                    b_lo, b_hi = _lut_portable(b, l0, l1)
                b_lo = b_lo.to(tl.float8e4nv, bitcast=True)
                b_hi = b_hi.to(tl.float8e4nv, bitcast=True)
                a_even, a_odd = tl.split(tl.reshape(a8, (BLOCK_M, HALF_K, 2)))
                if IMPRECISE_ACC > 0:
                    acc = tl.dot(a_even, b_lo, acc, max_num_imprecise_acc=IMPRECISE_ACC)
                    acc = tl.dot(a_odd, b_hi, acc, max_num_imprecise_acc=IMPRECISE_ACC)
                else:
                    acc = tl.dot(a_even, b_lo, acc)
                    acc = tl.dot(a_odd, b_hi, acc)
                b_ptrs += HALF_K
            else:
                b8 = b.to(tl.float8e4nv, bitcast=True)
                if IMPRECISE_ACC > 0:
                    acc = tl.dot(a8, b8, acc, max_num_imprecise_acc=IMPRECISE_ACC)
                else:
                    acc = tl.dot(a8, b8, acc)
                b_ptrs += BLOCK_K
            a_ptrs += BLOCK_K

        n_mask = offs_n < N
        if WS_PER_CHANNEL:
            ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
        else:
            ws = tl.load(ws_ptr)
        scale = xs * ws
        if WS_PER_CHANNEL:
            out = acc * scale[None, :]
        else:
            out = acc * scale
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            out = out + bias[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])

    @triton.jit
    def _quant_kernel(x_ptr, q_ptr, xs_ptr, numel, CLAMP: tl.constexpr, FMAX: tl.constexpr,
                      ACT_E5M2: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        xs = tl.load(xs_ptr)
        inv = tl.math.div_rn(1.0, xs)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        q = _to_fp8(x, inv, CLAMP, FMAX, ACT_E5M2)
        tl.store(q_ptr + offs, q, mask=mask)

    return triton, _fp8_linear_kernel, _quant_kernel


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------

_CAPABILITY: dict[int, tuple[int, int]] = {}


def _check_device(x: torch.Tensor, what: str) -> None:
    if _interpreting():
        return  # TRITON_INTERPRET=1: the kernel runs on the CPU (debugging only, slow)
    if x.device.type != "cuda":
        raise RuntimeError(
            f"{what} runs a Triton kernel on a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, "
            f"Blackwell); got a tensor on '{x.device}'. Use fp8_linear_reference on other devices."
        )
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(idx)
    if cap is None:
        cap = _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    if cap < (8, 9):
        raise RuntimeError(
            f"{what} needs FP8 tensor cores (compute capability 8.9 or newer); {torch.cuda.get_device_name(idx)} "
            f"has {cap[0]}.{cap[1]}. Use fp8_linear_reference, or a bf16 fallback, on this GPU."
        )


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
_CANDIDATES = {
    "tiny": [(16, 64, 128, 8, 4, 4), (16, 128, 128, 8, 4, 4), (32, 64, 128, 8, 4, 4), (16, 64, 256, 8, 4, 3)],
    "small": [(64, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4), (64, 256, 128, 8, 4, 3), (128, 128, 128, 8, 8, 3),
              (64, 64, 256, 8, 4, 3)],
    "large": [(128, 256, 128, 8, 8, 3), (128, 128, 128, 8, 8, 4), (128, 128, 128, 8, 4, 4), (64, 256, 128, 8, 4, 4),
              (128, 256, 64, 8, 8, 4), (64, 128, 128, 8, 4, 4)],
}
_TUNED: dict[tuple, tuple] = {}


def _bucket(m: int) -> str:
    return "tiny" if m <= 32 else ("small" if m <= 256 else "large")


def default_config(m: int, n: int, k: int, bits: int = 8) -> tuple[int, int, int, int, int, int]:
    """The block config used when none was tuned: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)."""
    b = _bucket(m)
    if b == "tiny":
        return (16, 64, 128, 8, 4, 4)
    if b == "small":
        return (64, 64, 128, 8, 4, 4) if n <= 1280 else (64, 128, 128, 8, 4, 4)
    return (128, 256, 128, 8, 8, 3)


def _as_scale(t, device, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t), dtype=torch.float32, device=device)
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x on {device}")
    return t


def _launch(x2, pw: PreparedWeight, w_scale, x_scale, bias, y, act_dtype, cfg, lut_mode, imprecise_acc, clamp):
    triton, kern, _ = _kernels()
    m, k = x2.shape
    n = pw.n
    bm, bn, bk, gm, nw, ns = cfg
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    kp = pw.codes.shape[1]
    t = pw.lut32
    l = pw.lut64
    kern[grid](
        x2, pw.codes, w_scale, x_scale, bias if bias is not None else w_scale, y,
        m, n, k, kp,
        x2.stride(0), pw.codes.stride(0), y.stride(0),
        t[0], t[1], t[2], t[3], l[0], l[1],
        W4=pw.bits == 4, LUT_ASM=lut_mode == "asm", ACT_E5M2=act_dtype == E5M2, CLAMP=clamp, FMAX=_fmax(act_dtype),
        WS_PER_CHANNEL=w_scale.numel() != 1, HAS_BIAS=bias is not None, EVEN_K=k % bk == 0,
        IMPRECISE_ACC=imprecise_acc,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=nw, num_stages=ns,
    )


def fp8_linear(
    x: torch.Tensor,
    w_codes: torch.Tensor | PreparedWeight,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weight_table: torch.Tensor | None = None,
    act_dtype: torch.dtype = E4M3,
    out_dtype: torch.dtype | None = None,
    config: tuple[int, int, int, int, int, int] | None = None,
    lut_mode: str | None = None,
    imprecise_acc: int = 0,
    clamp: bool | None = None,
) -> torch.Tensor:
    """Fused quantized Linear on a CUDA sm_89+ GPU; same signature and result as :func:`fp8_linear_reference`.

    ``w_codes`` may be a :class:`PreparedWeight` (from :func:`prepare_weight`, made once at load time; then
    ``weight_table`` is ignored). Extra keywords are for tuning and tests: ``config`` forces a block config,
    ``lut_mode`` ('asm' | 'portable') picks the 4-bit decoder, ``imprecise_acc`` > 0 makes Hopper's fp8 MMA
    promote its partial sums to fp32 every that many K elements (0: Triton's default), ``clamp`` adds an explicit
    clamp before the fp8 conversion (the GPU conversion saturates, so the result is the same without it).
    Raises ``RuntimeError`` on the CPU or on a GPU below compute capability 8.9.
    """
    _check_device(x, "fp8_linear")
    pw = prepare_weight(w_codes, weight_table)
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    out_dtype = out_dtype or x.dtype
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    k = x.shape[-1]
    pw.check_k(k)
    n = pw.n
    if pw.codes.device != x.device:
        raise ValueError(f"weights are on {pw.codes.device}, x on {x.device}")
    w_scale = _as_scale(w_scale, x.device, "w_scale")
    if w_scale.numel() not in (1, n):
        raise ValueError(f"w_scale must have 1 or N={n} elements, got {w_scale.numel()}")
    w_scale = w_scale.reshape(-1)
    if not w_scale.is_contiguous():
        w_scale = w_scale.contiguous()
    x_scale = _as_scale(x_scale, x.device, "x_scale")
    if x_scale.numel() != 1:
        raise ValueError(f"x_scale must be a single static scale (0-d), got shape {tuple(x_scale.shape)}")
    if bias is not None:
        if bias.numel() != n:
            raise ValueError(f"bias must have N={n} elements, got {bias.numel()}")
        bias = bias.reshape(-1)
        if not bias.is_contiguous():
            bias = bias.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if k > 0 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    if k == 0:
        y.copy_((bias.float() if bias is not None else torch.zeros(n, device=x.device)).expand(m, n))
        return y.reshape(*lead, n)
    if config is None:
        config = _TUNED.get((m, n, k, pw.bits)) or default_config(m, n, k, pw.bits)
    if lut_mode is None:
        lut_mode = "portable" if _interpreting() else "asm"
    if clamp is None:
        clamp = _interpreting()
    if x.device.type == "cuda" and x.device.index not in (None, torch.cuda.current_device()):
        with torch.cuda.device(x.device):
            _launch(x2, pw, w_scale, x_scale, bias, y, act_dtype, config, lut_mode, imprecise_acc, clamp)
    else:
        _launch(x2, pw, w_scale, x_scale, bias, y, act_dtype, config, lut_mode, imprecise_acc, clamp)
    return y.reshape(*lead, n)


def quantize_activation(x: torch.Tensor, x_scale: torch.Tensor, act_dtype: torch.dtype = E4M3) -> torch.Tensor:
    """One-pass Triton version of :func:`quantize_activation_reference` (for paths that need fp8 x in memory)."""
    _check_device(x, "quantize_activation")
    triton, _, qk = _kernels()
    xc = x.contiguous()
    q = torch.empty(xc.shape, dtype=act_dtype, device=x.device)
    numel = xc.numel()
    if numel:
        block = 4096
        qk[(triton.cdiv(numel, block),)](
            xc, q, _as_scale(x_scale, x.device, "x_scale"), numel,
            CLAMP=_interpreting(), FMAX=_fmax(act_dtype), ACT_E5M2=act_dtype == E5M2, BLOCK=block, num_warps=8,
        )
    return q


def tune_config(
    x: torch.Tensor,
    w: PreparedWeight,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    act_dtype: torch.dtype = E4M3,
    candidates=None,
    warmup_ms: float = 5,
    rep_ms: float = 25,
) -> tuple[tuple, list[tuple[tuple, float]]]:
    """Time the candidate block configs for this problem (CUDA only), remember the fastest for its (M, N, K, bits)
    and return it with all timings (ms; ``inf`` for configs that do not compile, e.g. out of shared memory)."""
    triton, _, _ = _kernels()
    from triton.testing import do_bench

    k = x.shape[-1]
    m = x.numel() // k
    cands = candidates or _CANDIDATES[_bucket(m)]
    results = []
    for cfg in cands:
        try:
            t = do_bench(lambda: fp8_linear(x, w, w_scale, x_scale, bias, act_dtype=act_dtype, config=cfg),
                         warmup=warmup_ms, rep=rep_ms, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a config that does not fit is skipped
            if "OutOfResources" not in type(e).__name__ and "out of resource" not in str(e).lower():
                raise
            t = math.inf
        results.append((cfg, t))
    best = min(results, key=lambda r: r[1])[0]
    _TUNED[(m, w.n, k, w.bits)] = best
    return best, results
