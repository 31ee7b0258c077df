"""Quantized Linear with a static FP8 activation scale: W8A8 (FP8 weights) and W4A8 (4-bit weights).

Semantics (``fp8_linear_reference`` is the definition; the Triton kernel must match it)::

    inv = 1 / x_scale                                   (fp32, once)
    q   = (x.float() * inv).clamp(-fmax, fmax).to(act_dtype)       round-to-nearest-even
    y   = (q.float() @ W.float().T) * (x_scale * w_scale) + bias   (fp32)
    y   = y.to(out_dtype or x.dtype)

(``x`` may also be already quantized: float8 of ``act_dtype``, then ``q = x`` and the output defaults to bf16.)
``fmax`` is 448 for float8_e4m3fn and 57344 for float8_e5m2. ``W`` is stored as uint8 codes, canonical layout:

* 8-bit weights (``weight_table is None``): ``(N, K)`` uint8 holding float8_e4m3fn bit patterns.
* 4-bit weights: ``(N, ceil(K/2))`` uint8; byte ``j`` of a row holds element ``2j`` in its low nibble and
  element ``2j+1`` in its high nibble (odd ``K``: the last high nibble is padding code 0). Code ``c`` means
  ``weight_table[c]`` (fp32, 16 entries, every value exactly representable in float8_e4m3fn).

The kernel (``fp8_linear``, CUDA sm_89+) loads the bf16/fp16/fp32 A tile, multiplies by ``inv`` and converts to
fp8 in registers (the same round-to-nearest-even, saturating conversion), so no separate quantize pass ever
touches memory. B tiles are fp8 (8-bit codes reinterpreted) or decoded from packed nibbles through a 16-entry
table of e4m3 bit patterns (two ``prmt`` byte-permutes per 4 codes). ``tl.dot`` accumulates in fp32 (on
Hopper with the MMA's own narrower accumulation between promotions, like cuBLAS "fast accumulation"; see
``imprecise_acc``); the epilogue applies ``x_scale * w_scale[n]``, adds the bias and casts to the output dtype.

The canonical (N, K) layout is already what an fp8 ``wgmma`` wants for B (K contiguous), so
``prepare_weight`` re-arranges nothing: it validates the codes, makes them contiguous and builds the 4-bit
code -> e4m3 table once. ``LinearPlan`` is the per-layer entry point for modules (least host work per call).
Triton is imported on the first kernel call only.

Measured on an H100 (benchmarks/NOTES_GPU.md): correct and bit-exact in the activation cast, but in device time
the fused W8A8 kernel runs at 0.70-0.73x of bf16 ``F.linear`` summed over the SD1.5/SDXL Linear layers (W4A8
0.49-0.54x), because every N-tile re-converts its A tile; fed an already-fp8 x it reaches 0.98-1.10x.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import weakref

import torch

__all__ = [
    "LinearPlan",
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
    if x.dtype in _FMAX:  # already quantized (q = x), e.g. by a producer that emits fp8 with this x_scale
        if x.dtype != act_dtype:
            raise ValueError(f"x is {x.dtype} but act_dtype is {act_dtype}")
        q = x
    else:
        q = quantize_activation_reference(x, xs, act_dtype)
    y = q.float() @ w.t()
    y = y * (xs * w_scale.to(device=x.device, dtype=torch.float32))
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or (torch.bfloat16 if x.dtype in _FMAX else x.dtype))


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


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedWeight:
    """Weights as the kernel consumes them (made once by :func:`prepare_weight`).

    ``codes`` is the canonical uint8 tensor, contiguous: ``(N, K)`` e4m3 bit patterns for 8-bit weights,
    ``(N, ceil(K/2))`` packed nibbles for 4-bit ones. ``lut`` holds the 16 e4m3 bit patterns of the code table
    (4-bit only), ``lut32`` the same as four little-endian int32 words, ``lut64`` as two int64 words.
    """

    codes: torch.Tensor
    bits: int
    n: int
    operand: torch.Tensor | None = None  # what the kernel reads: fp8 view of 8-bit codes, packed uint8 for 4-bit
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


_LUT_CACHE: dict[int, tuple[weakref.ref, int, tuple[int, ...]]] = {}


def _cached_lut(weight_table: torch.Tensor) -> tuple[int, ...]:
    """The table's e4m3 bit patterns, computed once per table tensor (and again if it is modified in place)."""
    key = id(weight_table)
    hit = _LUT_CACHE.get(key)
    if hit is not None and hit[0]() is weight_table and hit[1] == weight_table._version:
        return hit[2]
    lut = weight_table_to_e4m3_bits(weight_table)
    _LUT_CACHE[key] = (weakref.ref(weight_table, lambda _r, k=key: _LUT_CACHE.pop(k, None)), weight_table._version, lut)
    return lut


def prepare_weight(
    w_codes: torch.Tensor, weight_table: torch.Tensor | None = None, *, expand_to_k: int | None = None
) -> PreparedWeight:
    """Validate canonical uint8 codes and build what the kernel needs. Call once per layer at load time.

    Deterministic; re-arranges nothing (the canonical (N, K) layout is K-major, which is what the fp8 tensor
    cores want for B). For 4-bit weights the code table is turned into 16 e4m3 bit patterns here (a host read of
    16 values, so do it at load time, not per call).

    ``expand_to_k=K`` (4-bit weights only) decodes the codes once into 8-bit e4m3 codes ``(N, K)``: the layer then
    runs the W8A8 kernel (faster than decoding nibbles in the GEMM; same values, so the same result up to fp32
    summation order) at twice the weight memory of 4-bit storage, half of bf16.
    """
    if isinstance(w_codes, PreparedWeight):
        return w_codes
    if w_codes.dtype != torch.uint8 or w_codes.dim() != 2:
        raise ValueError(f"w_codes must be a 2-D uint8 tensor, got {w_codes.dtype} of shape {tuple(w_codes.shape)}")
    codes = w_codes.contiguous()
    if weight_table is not None and expand_to_k is not None:
        lut = torch.tensor(_cached_lut(weight_table), dtype=torch.uint8, device=codes.device)
        return prepare_weight(lut[unpack_nibbles(codes, expand_to_k).long()].contiguous())
    if weight_table is None:
        # fp8 dtype so that the B tile goes straight from shared memory into the MMA (a uint8 tile bitcast in
        # registers costs a shared -> register -> shared round trip every K step)
        return PreparedWeight(codes=codes, bits=8, n=codes.shape[0], operand=codes.view(E4M3))
    lut = _cached_lut(weight_table)
    w32 = tuple(_signed(sum(lut[4 * j + i] << (8 * i) for i in range(4)), 32) for j in range(4))
    w64 = tuple(_signed(sum(lut[8 * j + i] << (8 * i) for i in range(8)), 64) for j in range(2))
    return PreparedWeight(
        codes=codes, bits=4, n=codes.shape[0], operand=codes, table=weight_table, lut=lut, lut32=w32, lut64=w64
    )


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (built on first use)
# ----------------------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The jit functions below are plain Python until _kernels() wraps them (Triton is imported only then). Their
# annotations stay strings (``from __future__ import annotations``), which Triton reads as written.
tl = None  # triton.language, bound by _kernels()


# For 4 packed bytes w (uint8 x4 in one register) and the code table as four words t0..t3 (byte i of t_j = entry
# 4j+i): $0 byte i = entry[lo nibble of byte i], $1 byte i = entry[hi nibble of byte i]. prmt picks entries 0-7
# from (t0, t1) and 8-15 from (t2, t3) with the 3 low code bits; a sign-replicating prmt turns code bit 3 into a
# byte mask that selects between them.
def _lut_asm(p, t0, t1, t2, t3):
    z = tl.zeros(p.shape, tl.int32)
    lo, hi = tl.inline_asm_elementwise(
        "{\n"
        ".reg .b32 x, y, s, z, m, ra, rb;\n"
        "and.b32 x, $2, 0x07070707;\n"
        "shr.u32 y, x, 4;\n"
        "or.b32 y, y, x;\n"
        "prmt.b32 s, y, y, 0x0020;\n"
        "prmt.b32 ra, $3, $7, s;\n"
        "prmt.b32 rb, $11, $15, s;\n"
        "shl.b32 z, $2, 4;\n"
        "prmt.b32 m, z, z, 0xBA98;\n"
        "and.b32 rb, rb, m;\n"
        "not.b32 m, m;\n"
        "and.b32 ra, ra, m;\n"
        "or.b32 $0, ra, rb;\n"
        "shr.u32 x, $2, 4;\n"
        "and.b32 x, x, 0x07070707;\n"
        "shr.u32 y, x, 4;\n"
        "or.b32 y, y, x;\n"
        "prmt.b32 s, y, y, 0x0020;\n"
        "prmt.b32 ra, $3, $7, s;\n"
        "prmt.b32 rb, $11, $15, s;\n"
        "prmt.b32 m, $2, $2, 0xBA98;\n"
        "and.b32 rb, rb, m;\n"
        "not.b32 m, m;\n"
        "and.b32 ra, ra, m;\n"
        "or.b32 $1, ra, rb;\n"
        "}\n",
        "=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
        [p, z + t0, z + t1, z + t2, z + t3],
        dtype=(tl.uint8, tl.uint8),
        is_pure=True,
        pack=4,
    )
    return lo, hi


def _lut_portable(p, l0, l1):
    c_lo = (p & 15).to(tl.int64)
    c_hi = (p >> 4).to(tl.int64)
    w0 = l0.to(tl.int64)  # a table word that fits in 32 bits arrives as int32
    w1 = l1.to(tl.int64)
    v_lo = tl.where(c_lo < 8, w0, w1)
    v_hi = tl.where(c_hi < 8, w0, w1)
    lo = ((v_lo >> ((c_lo & 7) * 8)) & 255).to(tl.uint8)
    hi = ((v_hi >> ((c_hi & 7) * 8)) & 255).to(tl.uint8)
    return lo, hi


def _to_fp8(a, inv, CLAMP: tl.constexpr, FMAX: tl.constexpr, ACT_E5M2: tl.constexpr):
    if a.dtype.is_fp8():  # x already quantized
        return a
    v = a.to(tl.float32) * inv
    if CLAMP:
        v = tl.maximum(v, -FMAX, propagate_nan=tl.PropagateNan.ALL)
        v = tl.minimum(v, FMAX, propagate_nan=tl.PropagateNan.ALL)
    if ACT_E5M2:
        return v.to(tl.float8e5)
    else:
        return v.to(tl.float8e4nv)


def _dot_acc(a, b, acc, IMPRECISE_ACC: tl.constexpr):
    if IMPRECISE_ACC > 0:
        return tl.dot(a, b, acc, max_num_imprecise_acc=IMPRECISE_ACC)
    else:
        return tl.dot(a, b, acc)


def _dot_w4(a8, b, acc, t0, t1, t2, t3, l0, l1, LUT_ASM: tl.constexpr, IMPRECISE_ACC: tl.constexpr,
            BLOCK_M: tl.constexpr, HALF_K: tl.constexpr, B_IS_NK: tl.constexpr, JOIN: tl.constexpr):
    """acc += a8 @ decode(b): b holds packed codes, (HALF_K, BLOCK_N) or (B_IS_NK) (BLOCK_N, HALF_K). Low nibbles
    are the even k, high nibbles the odd k: either the fp8 A tile is split into its even and odd columns (two
    dots of HALF_K), or (JOIN) the two decoded halves are interleaved back into one (BLOCK_K, BLOCK_N) tile."""
    if LUT_ASM:
        b_lo, b_hi = _lut_asm(b, t0, t1, t2, t3)
    else:
        b_lo, b_hi = _lut_portable(b, l0, l1)
    b_lo = b_lo.to(tl.float8e4nv, bitcast=True)
    b_hi = b_hi.to(tl.float8e4nv, bitcast=True)
    if JOIN:
        bj = tl.join(b_lo, b_hi)  # [..., 2]: element (j, t) holds k = 2j + t
        if B_IS_NK:
            bk = tl.reshape(bj, (bj.shape[0], 2 * HALF_K)).T
        else:
            bk = tl.reshape(tl.permute(bj, (0, 2, 1)), (2 * HALF_K, bj.shape[1]))
        return _dot_acc(a8, bk, acc, IMPRECISE_ACC)
    if B_IS_NK:
        b_lo = b_lo.T
        b_hi = b_hi.T
    a_even, a_odd = tl.split(tl.reshape(a8, (BLOCK_M, HALF_K, 2)))
    acc = _dot_acc(a_even, b_lo, acc, IMPRECISE_ACC)
    return _dot_acc(a_odd, b_hi, acc, IMPRECISE_ACC)


def _tile_of_program(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program: output tiles in groups of GROUP_M rows, so programs running together share
    their A rows and B columns in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def _fp8_linear_kernel(
    x_ptr, w_ptr, ws_ptr, xs_ptr, b_ptr, y_ptr,
    M, N, K, KP,
    stride_xm, stride_wn, stride_ym,
    t0, t1, t2, t3, l0, l1,
    W4: tl.constexpr, LUT_ASM: tl.constexpr, ACT_E5M2: tl.constexpr, CLAMP: tl.constexpr, FMAX: tl.constexpr,
    WS_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IMPRECISE_ACC: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    W4_JOIN: tl.constexpr,
):
    """x_ptr / w_ptr are plain pointers, or (USE_TMA) tensor descriptors with blocks [BLOCK_M, BLOCK_K] of x and
    [BLOCK_N, BLOCK_K] (8-bit) / [BLOCK_N, BLOCK_K // 2] (4-bit) of the codes; TMA fills out-of-range with 0."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # rows past the end re-read valid rows; only the store is masked
    rn = offs_n % N

    xs = tl.load(xs_ptr)
    inv = tl.math.div_rn(1.0, xs)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            a = x_ptr.load([pid_m * BLOCK_M, kb * BLOCK_K])
            a8 = _to_fp8(a, inv, CLAMP, FMAX, ACT_E5M2)
            if W4:
                b = w_ptr.load([pid_n * BLOCK_N, kb * HALF_K])  # (BLOCK_N, HALF_K) packed
                acc = _dot_w4(a8, b, acc, t0, t1, t2, t3, l0, l1, LUT_ASM, IMPRECISE_ACC, BLOCK_M, HALF_K, True,
                               W4_JOIN)
            else:
                b = w_ptr.load([pid_n * BLOCK_N, kb * BLOCK_K]).to(tl.float8e4nv, bitcast=True)
                acc = _dot_acc(a8, b.T, acc, IMPRECISE_ACC)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :]
        if W4:
            offs_kp = tl.arange(0, HALF_K)
            b_ptrs = w_ptr + rn[None, :] * stride_wn + offs_kp[:, None]
        else:
            b_ptrs = w_ptr + rn[None, :] * stride_wn + offs_k[:, None]
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
                    b = tl.load(b_ptrs, mask=offs_k[:, None] < k_rem, other=0.0)
            a8 = _to_fp8(a, inv, CLAMP, FMAX, ACT_E5M2)
            if W4:
                acc = _dot_w4(a8, b, acc, t0, t1, t2, t3, l0, l1, LUT_ASM, IMPRECISE_ACC, BLOCK_M, HALF_K, False,
                               W4_JOIN)
                b_ptrs += HALF_K
            else:
                acc = _dot_acc(a8, b.to(tl.float8e4nv, bitcast=True), acc, IMPRECISE_ACC)
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


_NO_SPECIALIZE = ["M", "t0", "t1", "t2", "t3", "l0", "l1"]


@functools.cache
def _kernels():
    global tl, _lut_asm, _lut_portable, _to_fp8, _dot_acc, _dot_w4, _tile_of_program
    global _fp8_linear_kernel, _quant_kernel
    try:
        import triton
        import triton.language
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("fp8_linear needs the 'triton' package (pip install triton)") from e
    tl = triton.language
    _lut_asm = triton.jit(_lut_asm)
    _lut_portable = triton.jit(_lut_portable)
    _to_fp8 = triton.jit(_to_fp8)
    _dot_acc = triton.jit(_dot_acc)
    _dot_w4 = triton.jit(_dot_w4)
    _tile_of_program = triton.jit(_tile_of_program)
    _fp8_linear_kernel = triton.jit(_fp8_linear_kernel, do_not_specialize=_NO_SPECIALIZE)
    _quant_kernel = triton.jit(_quant_kernel)
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


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, maxnreg])
_CANDIDATES = {
    "tiny": [(16, 64, 128, 8, 4, 4), (16, 128, 128, 8, 4, 4), (32, 64, 128, 8, 4, 4), (16, 64, 256, 8, 4, 3)],
    "small": [(64, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4), (64, 64, 256, 8, 4, 3), (64, 32, 256, 8, 4, 3),
              (128, 128, 128, 8, 8, 3), (64, 128, 64, 8, 4, 4)],
    "large": [(128, 256, 128, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 128, 8, 8, 4), (64, 128, 128, 8, 4, 4),
              (128, 128, 64, 8, 8, 3, 128), (64, 256, 128, 8, 4, 3), (64, 256, 128, 8, 4, 2),
              (64, 256, 64, 8, 4, 3), (64, 128, 64, 8, 4, 4, 128)],
}
_TUNED: dict[tuple, tuple] = {}


def _bucket(m: int) -> str:
    return "tiny" if m <= 32 else ("small" if m <= 256 else "large")


# Block configs measured fastest on an H100 (benchmarks/bench_linear_kernels.py --tune, plain loads; the run in
# benchmarks/results/linear_kernels_h100.json), by (M, N, K, bits), for the Linear shapes of SD1.5 and SDXL at
# batch 2 (512^2 and 1024^2).
_H100_TUNED: dict[tuple[int, int, int, int], tuple[int, ...]] = {
    (128, 1280, 1280, 4): (64, 32, 256, 8, 4, 3),
    (128, 1280, 1280, 8): (64, 32, 256, 8, 4, 3),
    (128, 1280, 5120, 4): (64, 32, 256, 8, 4, 3),
    (128, 1280, 5120, 8): (64, 32, 256, 8, 4, 3),
    (128, 10240, 1280, 4): (128, 128, 128, 8, 8, 3),
    (128, 10240, 1280, 8): (128, 128, 128, 8, 8, 3),
    (154, 320, 768, 4): (64, 32, 256, 8, 4, 3),
    (154, 320, 768, 8): (64, 32, 256, 8, 4, 3),
    (154, 640, 768, 4): (64, 32, 256, 8, 4, 3),
    (154, 640, 768, 8): (64, 32, 256, 8, 4, 3),
    (154, 640, 2048, 4): (64, 32, 256, 8, 4, 3),
    (154, 640, 2048, 8): (64, 32, 256, 8, 4, 3),
    (154, 1280, 768, 4): (64, 32, 256, 8, 4, 3),
    (154, 1280, 768, 8): (64, 64, 128, 8, 4, 4),
    (154, 1280, 2048, 4): (64, 32, 256, 8, 4, 3),
    (154, 1280, 2048, 8): (64, 32, 256, 8, 4, 3),
    (512, 1280, 1280, 4): (128, 128, 128, 8, 8, 4),
    (512, 1280, 1280, 8): (64, 256, 128, 8, 4, 3),
    (512, 1280, 5120, 4): (64, 128, 128, 8, 4, 4),
    (512, 1280, 5120, 8): (64, 128, 128, 8, 4, 4),
    (512, 10240, 1280, 4): (64, 128, 64, 8, 4, 4, 128),
    (512, 10240, 1280, 8): (64, 128, 64, 8, 4, 4, 128),
    (2048, 640, 640, 4): (64, 256, 64, 8, 4, 3),
    (2048, 640, 640, 8): (64, 256, 128, 8, 4, 3),
    (2048, 640, 2560, 4): (128, 128, 128, 8, 8, 4),
    (2048, 640, 2560, 8): (64, 256, 128, 8, 4, 3),
    (2048, 1280, 1280, 4): (128, 256, 128, 8, 8, 3),
    (2048, 1280, 1280, 8): (64, 128, 64, 8, 4, 4, 128),
    (2048, 1280, 5120, 4): (128, 256, 128, 8, 8, 3),
    (2048, 1280, 5120, 8): (128, 256, 128, 8, 8, 3),
    (2048, 5120, 640, 4): (64, 256, 64, 8, 4, 3),
    (2048, 5120, 640, 8): (128, 256, 128, 8, 8, 3),
    (2048, 10240, 1280, 4): (128, 256, 128, 8, 8, 3),
    (2048, 10240, 1280, 8): (128, 256, 128, 8, 8, 3),
    (8192, 320, 320, 4): (64, 128, 64, 8, 4, 4, 128),
    (8192, 320, 320, 8): (64, 128, 64, 8, 4, 4, 128),
    (8192, 320, 1280, 4): (128, 256, 128, 8, 8, 3),
    (8192, 320, 1280, 8): (64, 128, 64, 8, 4, 4, 128),
    (8192, 640, 640, 4): (64, 128, 64, 8, 4, 4, 128),
    (8192, 640, 640, 8): (64, 128, 64, 8, 4, 4, 128),
    (8192, 640, 2560, 4): (64, 128, 64, 8, 4, 4, 128),
    (8192, 640, 2560, 8): (64, 128, 64, 8, 4, 4, 128),
    (8192, 2560, 320, 4): (64, 256, 64, 8, 4, 3),
    (8192, 2560, 320, 8): (64, 256, 64, 8, 4, 3),
    (8192, 5120, 640, 4): (128, 256, 128, 8, 8, 3),
    (8192, 5120, 640, 8): (128, 256, 128, 8, 8, 3),
}


def default_config(m: int, n: int, k: int, bits: int = 8) -> tuple[int, ...]:
    """The block config used when none was tuned in this process: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
    num_stages[, maxnreg]). The H100 table for known UNet shapes, else a rule by the size of M, N and K."""
    hit = _H100_TUNED.get((m, n, k, bits))
    if hit is not None:
        return hit
    b = _bucket(m)
    if b == "tiny":
        return (16, 64, 128, 8, 4, 4)
    if b == "small":
        return (64, 64, 256, 8, 4, 3) if k >= 256 else (64, 64, 128, 8, 4, 4)
    if k < 128:
        return (128, 128, 64, 8, 8, 4)
    return (128, 256, 128, 8, 8, 3) if n >= 2048 else (128, 128, 128, 8, 8, 4)


_SMEM_LIMIT: dict[int, int] = {}


def shared_memory_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one block may use on ``device`` (None under the interpreter: no limit)."""
    if _interpreting() or device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMEM_LIMIT:
        _SMEM_LIMIT[idx] = torch.cuda.get_device_properties(idx).shared_memory_per_block_optin
    return _SMEM_LIMIT[idx]


def fit_shared_memory(config: tuple[int, ...], x_bytes: int, limit: int | None) -> tuple[int, ...]:
    """``config`` with fewer pipeline stages (then a smaller BLOCK_K) until its tiles fit ``limit`` bytes.

    The tables are tuned for bf16/fp16 activations; the kernel keeps the A tile in the input's dtype (its cast to
    fp8 happens after the load), so an fp32 input doubles that tile, and the H100 configs with 3-4 stages of
    128x128 tiles then need 272 KB where Hopper has 227 KB (seen on an H200 with a float32 pipeline: Triton's
    OutOfResources). Estimate per stage: A ``BLOCK_M x BLOCK_K x x_bytes`` + B ``BLOCK_N x BLOCK_K`` (fp8), which
    is what Triton reported.
    """
    if limit is None:
        return config
    bm, bn, bk, gm, nw, ns, *rest = config

    def need(bk: int, ns: int) -> int:
        return ns * (bm * bk * x_bytes + bn * bk)

    while need(bk, ns) > limit and ns > 2:
        ns -= 1
    while need(bk, ns) > limit and bk > 32:
        bk //= 2
    return (bm, bn, bk, gm, nw, ns, *rest)


def _as_scale(t, device, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t), dtype=torch.float32, device=device)
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x on {device}")
    return t


def _tma_ok(x2: torch.Tensor, codes: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides."""
    return (
        x2.data_ptr() % 16 == 0
        and (x2.stride(0) * x2.element_size()) % 16 == 0
        and codes.data_ptr() % 16 == 0
        and codes.stride(0) % 16 == 0
    )


def _spec(v: int) -> int:
    """How Triton specialises an integer argument: equal to 1, a multiple of 16, 64-bit, or none of these."""
    return 1 if v == 1 else (16 if v % 16 == 0 else 0) + (2 if v >= 2**31 else 0)


# Compiled kernels by launch signature, so that repeated calls skip Triton's argument binder (tens of
# microseconds of Python per call, which an eager UNet pays 700 times per step). The key holds everything Triton
# specialises on for this kernel: the constexprs, launch options, dtypes, integer specialisation and 16-byte
# alignment of every pointer.
_FAST: dict[tuple, object] = {}
FAST_LAUNCH = True


def _launch(x2, pw: PreparedWeight, w_scale, x_scale, bias, y, act_dtype, cfg, lut_mode, imprecise_acc, clamp, tma,
            w4_join=False):
    triton, kern, _ = _kernels()
    m, k = x2.shape
    n = pw.n
    bm, bn, bk, gm, nw, ns = cfg[:6]
    maxnreg = cfg[6] if len(cfg) > 6 else None
    grid0 = ((m + bm - 1) // bm) * ((n + bn - 1) // bn)
    interp = _interpreting()
    # uint8 codes are bitcast in the kernel under the interpreter (no fp8 numpy type) and with promoted accumulation
    # (Triton 3.6's pipeliner rejects that combination with an fp8 pointer); otherwise B is read as fp8.
    w_op = pw.codes if (interp or imprecise_acc) else pw.operand
    b_arg = bias if bias is not None else w_scale
    kp = pw.codes.shape[1]
    w4 = pw.bits == 4
    consts = (
        w4, lut_mode == "asm", act_dtype == E5M2, clamp, _fmax(act_dtype), w_scale.numel() != 1, bias is not None,
        k % bk == 0, min(imprecise_acc, bk // 2 if w4 else bk), bool(tma), bm, bn, bk, gm, w4 and w4_join,
    )
    x_arg, w_arg = x2, w_op
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_arg = TensorDescriptor.from_tensor(x2, [bm, bk])
        w_arg = TensorDescriptor.from_tensor(w_op, [bn, bk // 2 if w4 else bk])
    t, l = pw.lut32, pw.lut64
    args = (x_arg, w_arg, w_scale, x_scale, b_arg, y, m, n, k, kp, x2.stride(0), w_op.stride(0), y.stride(0),
            t[0], t[1], t[2], t[3], l[0], l[1])
    key = None
    if FAST_LAUNCH and not interp:
        knobs = triton.knobs.runtime
        from fpq_plugin.kernels.qops import launch_hooks_idle

        if launch_hooks_idle(knobs):
            key = (consts, nw, ns, maxnreg, x2.dtype, y.dtype, b_arg.dtype, w_op.dtype, x2.device.index,
                   _spec(n), _spec(k), _spec(kp), _spec(x2.stride(0)), _spec(w_op.stride(0)), _spec(y.stride(0)),
                   x2.data_ptr() % 16, w_op.data_ptr() % 16, w_scale.data_ptr() % 16, x_scale.data_ptr() % 16,
                   b_arg.data_ptr() % 16, y.data_ptr() % 16)
            ck = _FAST.get(key)
            if ck is not None:
                ck.run(grid0, 1, 1, torch._C._cuda_getCurrentRawStream(x2.device.index), ck.function,
                       ck.packed_metadata, None, None, None, *args, *consts)
                return ck, grid0, consts, w_arg, args[6:]
    opts = dict(num_warps=nw, num_stages=ns)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    ck = kern[(grid0,)](
        *args,
        W4=consts[0], LUT_ASM=consts[1], ACT_E5M2=consts[2], CLAMP=consts[3], FMAX=consts[4],
        WS_PER_CHANNEL=consts[5], HAS_BIAS=consts[6], EVEN_K=consts[7], IMPRECISE_ACC=consts[8], USE_TMA=consts[9],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, W4_JOIN=consts[14], **opts,
    )
    if key is not None and ck is not None and hasattr(ck, "run"):
        _FAST[key] = ck
        return ck, grid0, consts, w_arg, args[6:]
    return None


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
    config: tuple[int, ...] | None = None,
    lut_mode: str | None = None,
    imprecise_acc: int = 0,
    clamp: bool | None = None,
    tma: bool | None = False,
    w4_join: bool = False,
    _info: list | None = None,
) -> torch.Tensor:
    """Fused quantized Linear on a CUDA sm_89+ GPU; same signature and result as :func:`fp8_linear_reference`.

    ``w_codes`` may be a :class:`PreparedWeight` (from :func:`prepare_weight`, made once at load time; then
    ``weight_table`` is ignored). ``x`` may be bf16/fp16/fp32, or already-quantized fp8 of ``act_dtype``.
    Extra keywords are for tuning and tests: ``config`` forces a block config, ``lut_mode`` ('asm' | 'portable')
    picks the 4-bit decoder, ``imprecise_acc`` > 0 makes Hopper's fp8 MMA promote its partial sums to fp32 every
    that many K elements (0: Triton's default, which promotes only at the end: see benchmarks/NOTES_GPU.md for
    the error of each), ``clamp`` adds an explicit clamp before the fp8 conversion (the GPU conversion saturates,
    so the result is the same without it), ``tma`` loads tiles through tensor descriptors (Hopper TMA) where the
    strides allow (``None``: on Hopper and newer; default ``False``: plain loads; TMA saves ~10% of device time
    but costs ~80 us of host time per call for the descriptors, a loss in eager mode), ``w4_join`` interleaves
    the decoded 4-bit halves into one B tile instead of splitting A. Raises ``RuntimeError`` on the CPU or on a
    GPU below compute capability 8.9.
    """
    _check_device(x, "fp8_linear")
    pw = w_codes if isinstance(w_codes, PreparedWeight) else prepare_weight(w_codes, weight_table)
    xd = x.dtype
    if xd not in _X_DTYPES:
        if xd not in _FMAX:
            raise ValueError(f"x must be bfloat16, float16, float32 or float8 of act_dtype, got {xd}")
        if xd != act_dtype:
            raise ValueError(f"x is {xd} but act_dtype is {act_dtype}")
    if out_dtype is None:
        out_dtype = xd if xd in _X_DTYPES else torch.bfloat16
    elif out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    k = x.shape[-1]
    n = pw.n
    if pw.codes.shape[1] != (k if pw.bits == 8 else (k + 1) // 2):
        pw.check_k(k)
    dev = x.device
    if pw.codes.device != dev:
        raise ValueError(f"weights are on {pw.codes.device}, x on {dev}")
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32 or w_scale.device != dev:
        w_scale = _as_scale(w_scale, dev, "w_scale")
    if w_scale.numel() not in (1, n):
        raise ValueError(f"w_scale must have 1 or N={n} elements, got {w_scale.numel()}")
    if w_scale.dim() != 1 or not w_scale.is_contiguous():
        w_scale = w_scale.reshape(-1).contiguous()
    if not isinstance(x_scale, torch.Tensor) or x_scale.dtype != torch.float32 or x_scale.device != dev:
        x_scale = _as_scale(x_scale, dev, "x_scale")
    if x_scale.numel() != 1:
        raise ValueError(f"x_scale must be a single static scale (0-d), got shape {tuple(x_scale.shape)}")
    if bias is not None:
        if bias.numel() != n:
            raise ValueError(f"bias must have N={n} elements, got {bias.numel()}")
        if bias.dim() != 1 or not bias.is_contiguous():
            bias = bias.reshape(-1).contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if k > 0 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    if k == 0:
        y.copy_((bias.float() if bias is not None else torch.zeros(n, device=dev)).expand(m, n))
        return y.reshape(*lead, n)
    if config is None:
        config = _TUNED.get((m, n, k, pw.bits)) or default_config(m, n, k, pw.bits)
        config = fit_shared_memory(config, x2.element_size(), shared_memory_limit(dev))
    if lut_mode is None:
        lut_mode = "portable" if _interpreting() else "asm"
    if clamp is None:
        clamp = _interpreting()
    if tma is not False:  # TMA: Hopper and newer, 16-byte aligned rows; otherwise plain loads
        cap = ((9, 0) if tma else (0, 0)) if _interpreting() else _CAPABILITY.get(dev.index or 0, (0, 0))
        tma = cap >= (9, 0) and not imprecise_acc and _tma_ok(x2, pw.codes)
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            info = _launch(x2, pw, w_scale, x_scale, bias, y, act_dtype, config, lut_mode, imprecise_acc, clamp, tma,
                           w4_join)
    else:
        info = _launch(x2, pw, w_scale, x_scale, bias, y, act_dtype, config, lut_mode, imprecise_acc, clamp, tma,
                       w4_join)
    if _info is not None:
        _info.append((info, x2, y))
    return y if len(lead) == 1 else y.reshape(*lead, n)


@functools.cache
def _qops():
    from fpq_plugin.kernels import qops

    return qops


class LinearPlan:
    """A quantized Linear's launcher, made once per layer: ``plan(x) == fp8_linear(x, w, w_scale, x_scale, bias)``.

    Weights, scales and bias are validated and prepared here; a call then does the least host work (for each new
    M: one ordinary :func:`fp8_linear` call, whose compiled kernel and launch arguments are kept; afterwards one
    output allocation and one direct launch). Falls back to :func:`fp8_linear` for anything unusual (strided or
    unaligned x, another dtype, the CPU, a launch hook).
    """

    def __init__(self, w_codes, w_scale, x_scale, bias=None, *, weight_table=None, act_dtype=E4M3, out_dtype=None,
                 tma=False, expand_to_k=None):
        self.w = w_codes if isinstance(w_codes, PreparedWeight) else prepare_weight(
            w_codes, weight_table, expand_to_k=expand_to_k)
        dev = self.w.codes.device
        n = self.n = self.w.n
        self.w_scale = _as_scale(w_scale, dev, "w_scale").reshape(-1).contiguous()
        if self.w_scale.numel() not in (1, n):
            raise ValueError(f"w_scale must have 1 or N={n} elements, got {self.w_scale.numel()}")
        self.x_scale = _as_scale(x_scale, dev, "x_scale")
        if self.x_scale.numel() != 1:
            raise ValueError(f"x_scale must be a single static scale (0-d), got shape {tuple(self.x_scale.shape)}")
        self.bias = None if bias is None else bias.reshape(-1).contiguous()
        if self.bias is not None and self.bias.numel() != n:
            raise ValueError(f"bias must have N={n} elements, got {self.bias.numel()}")
        self.act_dtype, self.out_dtype, self.tma = act_dtype, out_dtype, tma
        self._entries: dict[tuple, tuple] = {}

    def _slow(self, x, info=None):
        return fp8_linear(x, self.w, self.w_scale, self.x_scale, self.bias, act_dtype=self.act_dtype,
                          out_dtype=self.out_dtype, tma=self.tma, _info=info)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, k)
        m = x2.shape[0]
        ent = self._entries.get((m, x2.dtype))
        if ent is None or x2.stride(1) != 1 or x2.stride(0) != k or x2.data_ptr() % 16 or not FAST_LAUNCH:
            if ent is None and x.is_cuda and FAST_LAUNCH:
                info = []
                y = self._slow(x, info)
                if info and info[0][0] is not None:
                    self._remember(m, info[0])
                return y
            return self._slow(x)
        ck, grid0, consts, w_arg, tail, out_dtype, dev_idx, desc = ent
        if dev_idx != torch.cuda.current_device():
            return self._slow(x)
        int_pointers = _qops().INT_POINTERS[0]  # capturing under cudaMallocAsync (see qops.pointer_args_as_ints)
        if int_pointers and desc is not None:
            return self._slow(x)  # a TMA descriptor holds the tensor itself; Triton's binder (counted there) runs it
        y = torch.empty((m, self.n), dtype=out_dtype, device=x2.device)
        xa = x2 if desc is None else desc(x2, [m, k], [k, 1], [consts[10], consts[12]])
        ptrs = (xa, w_arg, self.w_scale, self.x_scale, self.bias if self.bias is not None else self.w_scale, y)
        if int_pointers:
            ptrs = _qops().raw_pointers(ptrs)
        ck.run(grid0, 1, 1, torch._C._cuda_getCurrentRawStream(dev_idx), ck.function, ck.packed_metadata,
               None, None, None, *ptrs, m, *tail[1:], *consts)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.n)

    def _remember(self, m, info):
        (launch, x2, y) = info
        ck, grid0, consts, w_arg, tail = launch
        if x2.stride(0) != x2.shape[1] or y.stride(0) != self.n:
            return
        desc = None
        if consts[9]:  # TMA: a new descriptor for each x, the weights' one is kept
            from triton.tools.tensor_descriptor import TensorDescriptor as desc
        self._entries[(m, x2.dtype)] = (ck, grid0, consts, w_arg, tail, y.dtype, x2.device.index, desc)


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
    rep_ms: float = 20,
) -> tuple[tuple, list[tuple[tuple, float]]]:
    """Time the candidate block configs for this problem (CUDA only), remember the fastest for its (M, N, K, bits)
    and return it with all timings (ms; ``inf`` for configs that do not compile, e.g. out of shared memory)."""
    triton, _, _ = _kernels()
    from triton.testing import do_bench

    k = x.shape[-1]
    m = x.numel() // k
    cands = candidates or _CANDIDATES[_bucket(m)]
    best_t = {c: math.inf for c in cands}
    for _ in range(2):  # two passes, keep each config's best: one pass is noisy at these few-microsecond sizes
        for cfg in cands:
            try:
                t = do_bench(lambda: fp8_linear(x, w, w_scale, x_scale, bias, act_dtype=act_dtype, config=cfg),
                             warmup=warmup_ms, rep=rep_ms, return_mode="median")
            except Exception:  # noqa: BLE001 - a config that does not compile or fit (shared memory) is skipped
                t = math.inf
            best_t[cfg] = min(best_t[cfg], t)
    results = list(best_t.items())
    if all(math.isinf(t) for _, t in results):
        raise RuntimeError(f"no candidate config ran for M={m} N={w.n} K={k} ({w.bits}-bit weights)")
    best = min(results, key=lambda r: r[1])[0]
    _TUNED[(m, w.n, k, w.bits)] = best
    return best, results
