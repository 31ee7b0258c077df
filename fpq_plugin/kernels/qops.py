"""Small memory-bound Triton kernels that let cuBLAS/cuDNN run quantized layers, with pure-PyTorch references.

* ``decode_weight``: uint8 codes (8-bit, or two 4-bit codes per byte, low nibble = even element) -> a dense
  ``(N, K)`` weight, either

  - float (bf16/fp16/fp32): ``(table[code] - zp[n]) * w_scale[n] * x_scale`` (``x_scale`` folded in so that a
    GEMM on the activation's *grid values* needs no epilogue), or
  - fp8 e4m3 bit patterns: ``lut[code]`` with no scale (4-bit weights fed to the FP8 tensor cores).

  Called per forward into a fresh (caching-allocator) tensor that lives only for that layer's GEMM: the model keeps
  its 4-/8-bit codes in VRAM and the transient costs one layer's dense weight. The decode moves ~3 bytes per weight
  (bf16) or ~1.5 (fp8): for all of SDXL's 2.6 G weights about 2 ms per UNet call at 3 TB/s.
* ``quantize_fp8``: ``(x * (1 / x_scale)).clamp(-fmax, fmax) -> fp8`` in one pass (the activation cast of
  :func:`fpq_plugin.kernels.fp8_linear.fp8_linear_reference`).
* ``fake_quantize_grid``: the same cast, but written back in ``x``'s dtype as the fp8 *grid value* (exact in
  bf16/fp16/fp32), so a bf16 GEMM/conv with a weight decoded with ``x_scale`` folded in computes the quantized layer.
* ``fake_quantize_grid_channels_last`` and ``decode_weight(..., taps=KH*KW)``: the same for a conv, written in
  channels-last memory, which cuDNN's bf16/fp16 kernels use (on NCHW operands cuDNN transposes both per call).
* ``cast_and_decode4``: ``quantize_fp8`` of an activation and the fp8 decode of a 4-bit weight in one launch (a
  W4A8 Linear's two operands for cuBLAS: each alone is a small kernel whose fixed cost is most of its time).
* ``relayout``: the plain NCHW <-> channels-last copy (a weight-only conv's input, a conv's output back to NCHW).

Every kernel launch after the first of a given signature goes through :func:`_fast_launch` (a cached compiled
kernel called directly), because an eager UNet calls them ~1000 times per step and Triton's Python binder costs
tens of microseconds per call on the test VM (see benchmarks/NOTES_GPU.md).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

__all__ = [
    "cast_and_decode4",
    "cast_and_decode4_reference",
    "decode_weight",
    "decode_weight_reference",
    "fake_quantize_grid",
    "fake_quantize_grid_channels_last",
    "fake_quantize_grid_reference",
    "quantize_fp8",
    "quantize_fp8_reference",
    "relayout",
]

_FMAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------------------------
# References (pure PyTorch, any device)
# ----------------------------------------------------------------------------------------------------------------


def _unpack(codes: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2)[..., :k]


def decode_weight_reference(codes, k, table, w_scale=None, zero_point=None, x_scale=None, *, bits4, dtype):
    """Definition of :func:`decode_weight` (fp32 arithmetic, then one rounding to ``dtype``)."""
    c = _unpack(codes, k) if bits4 else codes
    if dtype == torch.uint8:  # raw table entries (e.g. e4m3 bit patterns), no scale
        return table.to(codes.device)[c.long()]
    v = table.to(device=codes.device, dtype=torch.float32)[c.long()]
    if zero_point is not None:
        v = v - zero_point.float().reshape(-1, 1)
    s = torch.ones((), device=codes.device) if w_scale is None else w_scale.float().reshape(-1, 1)
    if x_scale is not None:
        s = s * x_scale.float()
    return (v * s).to(dtype)


def quantize_fp8_reference(x: torch.Tensor, x_scale: torch.Tensor, act_dtype=torch.float8_e4m3fn) -> torch.Tensor:
    fmax = _FMAX[act_dtype]
    return (x.float() * torch.reciprocal(x_scale.float())).clamp(-fmax, fmax).to(act_dtype)


def cast_and_decode4_reference(x, x_scale, codes, k, lut8, act_dtype=torch.float8_e4m3fn):
    """Definition of :func:`cast_and_decode4`: ``(quantize_fp8_reference(x), raw 4-bit decode of codes)``."""
    return (quantize_fp8_reference(x, x_scale, act_dtype),
            decode_weight_reference(codes, k, lut8, bits4=True, dtype=torch.uint8))


def fake_quantize_grid_reference(x: torch.Tensor, x_scale: torch.Tensor, act_dtype=torch.float8_e4m3fn):
    return quantize_fp8_reference(x, x_scale, act_dtype).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (plain functions until _kernels() wraps them; Triton is imported only then)
# ----------------------------------------------------------------------------------------------------------------

tl = None  # triton.language, bound by _kernels()


def _cast_fp8(x, inv, CLAMP: tl.constexpr, FMAX: tl.constexpr, ACT_E5M2: tl.constexpr):
    v = x.to(tl.float32) * inv
    if CLAMP:  # the GPU conversion saturates by itself; the interpreter's numpy emulation does not
        v = tl.minimum(tl.maximum(v, -FMAX), FMAX)
    if ACT_E5M2:
        return v.to(tl.float8e5)
    else:
        return v.to(tl.float8e4nv)


def _quant_block(x_ptr, q_ptr, xs_ptr, numel, pid, CLAMP: tl.constexpr, FMAX: tl.constexpr,
                 ACT_E5M2: tl.constexpr, GRID_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """Elements pid*BLOCK.. of q = fp8(x / xs); GRID_OUT: the fp8 value stored in q's (float) dtype instead."""
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    inv = tl.math.div_rn(1.0, tl.load(xs_ptr))
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    q = _cast_fp8(x, inv, CLAMP, FMAX, ACT_E5M2)
    if GRID_OUT:
        tl.store(q_ptr + offs, q.to(tl.float32).to(q_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(q_ptr + offs, q, mask=mask)


def _quant_kernel(x_ptr, q_ptr, xs_ptr, numel,
                  CLAMP: tl.constexpr, FMAX: tl.constexpr, ACT_E5M2: tl.constexpr, GRID_OUT: tl.constexpr,
                  BLOCK: tl.constexpr):
    """q = fp8(x / xs); GRID_OUT: store the fp8 value in q's (float) dtype instead."""
    _quant_block(x_ptr, q_ptr, xs_ptr, numel, tl.program_id(0), CLAMP, FMAX, ACT_E5M2, GRID_OUT, BLOCK)


def _decode_kernel(c_ptr, t_ptr, ws_ptr, zp_ptr, xs_ptr, o_ptr, N, K, KP, stride_c, stride_o,
                   BITS4: tl.constexpr, RAW: tl.constexpr, WS_PER_CHANNEL: tl.constexpr, HAS_ZP: tl.constexpr,
                   FOLD_XS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """Tile (program_id(0), program_id(1)) of the decoded weight (see _decode_tile)."""
    _decode_tile(c_ptr, t_ptr, ws_ptr, zp_ptr, xs_ptr, o_ptr, N, K, KP, stride_c, stride_o, tl.program_id(0),
                 tl.program_id(1), BITS4, RAW, WS_PER_CHANNEL, HAS_ZP, FOLD_XS, BLOCK_N, BLOCK_J)


def _cast_decode4_kernel(x_ptr, q_ptr, xs_ptr, numel, c_ptr, t_ptr, o_ptr, N, K, KP, stride_c, stride_o,
                         CAST_PROGS, DECODE_COLS, CLAMP: tl.constexpr, FMAX: tl.constexpr, ACT_E5M2: tl.constexpr,
                         QBLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """One launch for a W4A8 layer's two operands: programs below CAST_PROGS cast the activation (q = fp8(x / xs)),
    the rest decode the 4-bit weight to e4m3 bit patterns, DECODE_COLS tiles per row of tiles."""
    pid = tl.program_id(0)
    if pid < CAST_PROGS:
        _quant_block(x_ptr, q_ptr, xs_ptr, numel, pid, CLAMP, FMAX, ACT_E5M2, False, QBLOCK)
    else:
        t = pid - CAST_PROGS
        _decode_tile(c_ptr, t_ptr, t_ptr, t_ptr, t_ptr, o_ptr, N, K, KP, stride_c, stride_o, t // DECODE_COLS,
                     t % DECODE_COLS, True, True, False, False, False, BLOCK_N, BLOCK_J)


def _decode_tile(c_ptr, t_ptr, ws_ptr, zp_ptr, xs_ptr, o_ptr, N, K, KP, stride_c, stride_o, pid_n, pid_j,
                 BITS4: tl.constexpr, RAW: tl.constexpr, WS_PER_CHANNEL: tl.constexpr, HAS_ZP: tl.constexpr,
                 FOLD_XS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """Tile (pid_n, pid_j): (BLOCK_N, BLOCK_J) code bytes -> (BLOCK_N, BLOCK_J or 2*BLOCK_J) output elements. The
    table is gathered from global memory (16 or 256 entries: L1-resident)."""
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    n_ok = rn < N
    c = tl.load(c_ptr + rn[:, None].to(tl.int64) * stride_c + rj[None, :], mask=n_ok[:, None] & (rj[None, :] < KP),
                other=0)
    if not RAW:
        if WS_PER_CHANNEL:
            s = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
        else:
            s = tl.load(ws_ptr + rn * 0)
        if FOLD_XS:
            s = s * tl.load(xs_ptr)
        if HAS_ZP:
            zp = tl.load(zp_ptr + rn, mask=n_ok, other=0.0)
    if BITS4:
        lo = tl.load(t_ptr + (c & 15).to(tl.int32))
        hi = tl.load(t_ptr + (c >> 4).to(tl.int32))
        if not RAW:
            if HAS_ZP:
                lo = lo - zp[:, None]
                hi = hi - zp[:, None]
            lo = lo * s[:, None]
            hi = hi * s[:, None]
        v = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_J))  # element (n, 2j + t) = (lo, hi)[t][n, j]
        rk = pid_j * (2 * BLOCK_J) + tl.arange(0, 2 * BLOCK_J)
    else:
        v = tl.load(t_ptr + c.to(tl.int32))
        if not RAW:
            if HAS_ZP:
                v = v - zp[:, None]
            v = v * s[:, None]
        rk = rj
    tl.store(o_ptr + rn[:, None].to(tl.int64) * stride_o + rk[None, :], v.to(o_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (rk[None, :] < K))


def _decode_taps_last_kernel(c_ptr, t_ptr, ws_ptr, zp_ptr, xs_ptr, o_ptr, C, stride_c, stride_o,
                             TAPS: tl.constexpr, BITS4: tl.constexpr, WS_PER_CHANNEL: tl.constexpr,
                             HAS_ZP: tl.constexpr, FOLD_XS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Filter program_id(0) of a conv weight, channels program_id(1)*BLOCK_C..: for each tap t, the codes of
    (c, t) (TAPS bytes apart, read through L1, which holds the row's lines across the taps) are written at
    t * C + c of the channels-last row, so every store is contiguous along C. (A first version wrote each element
    to its channels-last position, scattered: 7 ms per SD1.5 forward on an H200; a (C, 16-padded taps) tile with
    coalesced stores: 1.08 ms, 2.6x its bytes.)"""
    n = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = rc < C
    row = c_ptr + n.to(tl.int64) * stride_c
    out = o_ptr + n.to(tl.int64) * stride_o
    if WS_PER_CHANNEL:
        s = tl.load(ws_ptr + n)
    else:
        s = tl.load(ws_ptr)
    if FOLD_XS:
        s = s * tl.load(xs_ptr)
    if HAS_ZP:
        zp = tl.load(zp_ptr + n)
    for t in tl.static_range(TAPS):
        j = rc * TAPS + t  # element index within the row
        if BITS4:
            byte = tl.load(row + j // 2, mask=mask, other=0)
            code = (byte >> ((j % 2) * 4).to(tl.uint8)) & 15
        else:
            code = tl.load(row + j, mask=mask, other=0)
        v = tl.load(t_ptr + code.to(tl.int32))
        if HAS_ZP:
            v = v - zp
        v = v * s
        tl.store(out + t * C + rc, v.to(o_ptr.dtype.element_ty), mask=mask)


def _relayout_kernel(x_ptr, q_ptr, xs_ptr, b_ptr, C, HW,
                     QUANT: tl.constexpr, TO_CL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     CLAMP: tl.constexpr, FMAX: tl.constexpr, ACT_E5M2: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """One (BLOCK_C, BLOCK_HW) tile of image program_id(2) moved between NCHW and channels-last memory (TO_CL: NCHW
    in, channels-last out; else the reverse), read along the input's contiguous axis and stored along the output's
    (Triton moves the tile through shared memory between the two coalesced layouts). QUANT: the values written are
    the grid values (in q's float dtype) of fp8(x / xs); else a plain copy. HAS_BIAS: q = x + bias[c], rounded once
    to q's dtype (a conv's bias, which PyTorch adds to a cuDNN output in a separate pass of its own)."""
    rhw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    base = tl.program_id(2).to(tl.int64) * C * HW
    mask = (rc[:, None] < C) & (rhw[None, :] < HW)
    nchw = rc[:, None] * HW + rhw[None, :]
    nhwc = rhw[None, :] * C + rc[:, None]
    if TO_CL:
        x = tl.load(x_ptr + base + nchw, mask=mask, other=0.0)
    else:
        x = tl.load(x_ptr + base + nhwc, mask=mask, other=0.0)
    if QUANT:
        inv = tl.math.div_rn(1.0, tl.load(xs_ptr))
        x = _cast_fp8(x, inv, CLAMP, FMAX, ACT_E5M2).to(tl.float32)
    if HAS_BIAS:
        x = x.to(tl.float32) + tl.load(b_ptr + rc, mask=rc < C, other=0.0).to(tl.float32)[:, None]
    x = x.to(q_ptr.dtype.element_ty)
    if TO_CL:
        tl.store(q_ptr + base + nhwc, x, mask=mask)
    else:
        tl.store(q_ptr + base + nchw, x, mask=mask)


@functools.cache
def _kernels():
    global tl, _cast_fp8, _quant_block, _quant_kernel, _decode_tile, _decode_kernel, _cast_decode4_kernel
    global _relayout_kernel, _decode_taps_last_kernel
    try:
        import triton
        import triton.language
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("fpq's GPU kernels need the 'triton' package (pip install triton)") from e
    tl = triton.language
    _cast_fp8 = triton.jit(_cast_fp8)
    # Integer arguments stay specialised (Triton compiles per "multiple of 16" / "equal to 1"): without knowing
    # that sizes and row strides are multiples of 16, Triton cannot prove vector alignment and issues one 1-2 byte
    # access per element (the activation cast ran at 13 us per SDXL Linear, 3x its bytes). _fast_launch keys on
    # the same properties.
    _quant_block = triton.jit(_quant_block)
    _quant_kernel = triton.jit(_quant_kernel)
    _decode_tile = triton.jit(_decode_tile)
    _decode_kernel = triton.jit(_decode_kernel)
    _cast_decode4_kernel = triton.jit(_cast_decode4_kernel)
    _decode_taps_last_kernel = triton.jit(_decode_taps_last_kernel)
    _relayout_kernel = triton.jit(_relayout_kernel)
    return triton, _quant_kernel, _decode_kernel


def jit_cast_writer(kernel):
    """``(triton, triton.jit(kernel))`` for a kernel of another module that writes an activation cast with
    ``_cast_fp8`` (the GEGLU and LayerNorm kernels): binds that module's ``tl`` and ``_cast_fp8`` first, so every
    fp8 activation cast in fpq is the same conversion and a consumer may take it for its own."""
    triton = _kernels()[0]
    kernel.__globals__.update(tl=triton.language, _cast_fp8=_cast_fp8)
    return triton, triton.jit(kernel)


def check_cast_scale(x_scale: torch.Tensor, act_dtype, device, what: str) -> None:
    """Raise ValueError (naming ``what``) unless ``act_dtype`` is an fp8 activation dtype and ``x_scale`` one fp32
    element on ``device``, as a layer's ``input_scale`` is."""
    if act_dtype not in _FMAX:
        raise ValueError(f"{what} cast: act_dtype must be one of {sorted(map(str, _FMAX))}, got {act_dtype}")
    if x_scale.numel() != 1 or x_scale.dtype != torch.float32 or x_scale.device != device:
        raise ValueError(f"{what} cast: x_scale must be one fp32 element on {device} (a layer's input_scale), "
                         f"got {x_scale.dtype} of shape {tuple(x_scale.shape)} on {x_scale.device}")


# ----------------------------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------------------------

_FAST: dict[tuple, object] = {}
FAST_LAUNCH = True
INT_POINTERS = [False]  # set by pointer_args_as_ints()


@contextlib.contextmanager
def pointer_args_as_ints():
    """Within this context the cached launches (:class:`Launch`, :func:`_fast_launch`'s direct path and
    ``fp8_linear.LinearPlan``) hand Triton each tensor's address as a plain int.

    Why: Triton's launcher asks the driver about every tensor argument's pointer (``cuPointerGetAttribute``), and
    memory that PyTorch's cudaMallocAsync allocator hands out inside a CUDA-graph capture is not mapped until the
    graph runs, so the check fails and the capture with it (PyTorch then aborts the process when it frees that
    capture's memory). An int is passed through unchecked. Launches through Triton's own binder (a first call of
    a signature) still check: :func:`count_triton_binder_launches` finds them before a capture."""
    prev = INT_POINTERS[0]
    INT_POINTERS[0] = True
    try:
        yield
    finally:
        INT_POINTERS[0] = prev


def raw_pointers(args) -> tuple:
    """``args`` with every tensor replaced by its address (see :func:`pointer_args_as_ints`)."""
    return tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)


@contextlib.contextmanager
def count_triton_binder_launches():
    """Count, in the yielded one-element list, the Triton kernels launched through Triton's Python binder
    (``JITFunction.run``: fpq's first call of a signature, or any other library's Triton kernel) while inside.
    fpq's cached direct launches do not go through it. Without Triton nothing can launch; the count stays 0."""
    count = [0]
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield count
        return
    original = JITFunction.run

    def run(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    JITFunction.run = run
    try:
        yield count
    finally:
        JITFunction.run = original


def launch_hooks_idle(runtime_knobs) -> bool:
    """True when no Triton launch hook is installed, so a direct ``CompiledKernel.run`` (which passes no hooks)
    skips nothing. Triton <= 3.4 keeps each hook as a function or None; 3.5+ as a ``HookChain`` that is never None
    and is idle while its ``calls`` list is empty. (Testing ``is None`` alone silently disabled every cached launch
    on Triton 3.6: each eager call went through Triton's binder, ~100 us of host time per quantized layer.)"""
    for hook in (runtime_knobs.launch_enter_hook, runtime_knobs.launch_exit_hook):
        if hook is None:
            continue
        calls = getattr(hook, "calls", None)
        if not (isinstance(calls, list) and not calls):
            return False
    return True


def _fast_launch(kern, grid, args, consts: dict, num_warps: int):
    """``kern[grid](*args, **consts, num_warps=...)``, but after the first launch of a signature the compiled kernel
    is called directly. The key holds what Triton specialises on: every constexpr, the tensors' dtypes and 16-byte
    alignment, and for each integer whether it is a multiple of 16 and whether it is 1."""
    interp = _interpreting()
    if FAST_LAUNCH and not interp:
        import triton

        knobs = triton.knobs.runtime
        if launch_hooks_idle(knobs):
            key = (id(kern), tuple(consts.values()), num_warps, len(grid),
                   *((a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor)
                     else (a % 16 == 0, a == 1) if isinstance(a, int) else None for a in args))
            dev = next(a for a in args if isinstance(a, torch.Tensor)).device.index
            ck = _FAST.get(key + (dev,))
            g = tuple(grid) + (1,) * (3 - len(grid))
            if ck is not None:
                ck.run(*g, torch._C._cuda_getCurrentRawStream(dev), ck.function, ck.packed_metadata, None, None,
                       None, *(raw_pointers(args) if INT_POINTERS[0] else args), *consts.values())
                return ck
            ck = kern[grid](*args, **consts, num_warps=num_warps)
            if hasattr(ck, "run"):
                _FAST[key + (dev,)] = ck
                return ck
            return None
    kern[grid](*args, **consts, num_warps=num_warps)
    return None


class Launch:
    """A kernel launch whose compiled kernel, grid and constant arguments are fixed: ``launch(stream_dev, *args)``
    costs one C call. Only valid for arguments with the same dtypes, 16-byte alignment and (for the specialised
    integers) values as the launch it was made from; callers key it accordingly."""

    __slots__ = ("ck", "grid", "consts")

    def __init__(self, ck, grid, consts):
        self.ck, self.grid, self.consts = ck, tuple(grid) + (1,) * (3 - len(grid)), tuple(consts.values())

    def __call__(self, dev: int, *args) -> None:
        ck = self.ck
        if INT_POINTERS[0]:
            args = raw_pointers(args)
        ck.run(*self.grid, torch._C._cuda_getCurrentRawStream(dev), ck.function, ck.packed_metadata, None, None,
               None, *args, *self.consts)


# Module-wide switch (benchmarks compare with it off): the norm and GEGLU wrappers repeat a launch they made before
# through a CallSiteLaunches entry instead of recomputing its arguments and going through _fast_launch.
CALL_SITE_LAUNCHES = True


class CallSiteLaunches:
    """The repeatable launches of one kernel wrapper, under keys the wrapper builds from what fixes them: the input
    shapes (so every integer argument), dtypes and 16-byte alignment of the tensors it was given (its outputs are
    fresh allocations, always aligned), constexpr choices and the device.

    Why: a hit skips the wrapper's derived arithmetic and :func:`_fast_launch`'s generic key over every argument,
    the largest own costs left in an eager fpq norm (SD1.5 GroupNorm host time ~170 us profiled against PyTorch's
    ~50 us before; W8A8's eager forward 55.5 -> 40.3 ms of host time on an H100,
    ``benchmarks/results/eager_host_fp16_infer_call_site_h100.json``). An entry is only stored when every launch of
    the call came back as a compiled kernel, i.e. while no Triton launch hook is installed."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple] = {}

    def get(self, key: tuple):
        return self._entries.get(key) if CALL_SITE_LAUNCHES else None

    def remember(self, key: tuple, compiled: tuple, grids: tuple, consts: tuple, extra: tuple = ()) -> None:
        """Store one :class:`Launch` per ``(compiled kernel, grid, consts)`` (skipped if any kernel is None), plus
        ``extra`` values the wrapper needs on a hit, as ``(*launches, *extra)``."""
        if CALL_SITE_LAUNCHES and all(ck is not None for ck in compiled):
            self._entries[key] = (*(Launch(ck, g, c) for ck, g, c in zip(compiled, grids, consts)), *extra)

    def __len__(self) -> int:
        return len(self._entries)


def tensor_key(t: torch.Tensor | None) -> tuple | None:
    """What a launch specialises on for an optional tensor argument: its dtype and 16-byte alignment."""
    return None if t is None else (t.dtype, t.data_ptr() % 16)


def _check(x: torch.Tensor) -> None:
    if not (x.is_cuda or _interpreting()):
        raise RuntimeError(f"fpq GPU kernels need a CUDA tensor, got one on {x.device}")


def _flat_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` if its elements are dense in memory in some order (contiguous or channels-last), else a copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


_QBLOCK = 4096


def _quant(x, x_scale, act_dtype, grid_out, launch_out):
    _check(x)
    triton, qk, _ = _kernels()
    x = _flat_view(x)
    q = torch.empty_like(x) if grid_out else torch.empty_like(x, dtype=act_dtype)
    n = x.numel()
    if n:
        grid = (triton.cdiv(n, _QBLOCK),)
        consts = dict(CLAMP=_interpreting(), FMAX=_FMAX[act_dtype], ACT_E5M2=act_dtype == torch.float8_e5m2,
                      GRID_OUT=grid_out, BLOCK=_QBLOCK)
        ck = _fast_launch(qk, grid, (x, q, x_scale, n), consts, 8)
        if launch_out is not None and ck is not None:
            launch_out.append(Launch(ck, grid, consts))
    return q


def quantize_fp8(x: torch.Tensor, x_scale: torch.Tensor, act_dtype=torch.float8_e4m3fn, *, launch_out=None):
    """One-pass ``fp8(x / x_scale)`` (saturating, round-to-nearest-even), same layout as ``x``. ``launch_out``: a
    list that receives a :class:`Launch` for repeating this call as ``launch(dev, x, q, x_scale, x.numel())``."""
    return _quant(x, x_scale, act_dtype, False, launch_out)


def fake_quantize_grid(x: torch.Tensor, x_scale: torch.Tensor, act_dtype=torch.float8_e4m3fn, *, launch_out=None):
    """``fp8(x / x_scale)`` as values of ``x``'s dtype (exact), same layout as ``x``: one pass."""
    return _quant(x, x_scale, act_dtype, True, launch_out)


def fake_quantize_grid_channels_last(x: torch.Tensor, x_scale: torch.Tensor, act_dtype=torch.float8_e4m3fn, *,
                                     launch_out=None) -> torch.Tensor:
    """:func:`fake_quantize_grid` of a contiguous NCHW ``x``, returned in channels-last memory (one pass: the
    layout change cuDNN would otherwise make with a separate transpose before its NHWC convolution kernels).
    ``launch_out`` receives a :class:`Launch` for ``launch(dev, x, q, x_scale, x, C, H*W)`` with the same shape."""
    return _relayout(x, True, x_scale, act_dtype, launch_out)


def relayout(x: torch.Tensor, channels_last: bool, *, bias: torch.Tensor | None = None,
             launch_out=None) -> torch.Tensor:
    """``x.contiguous(memory_format=...)`` between NCHW and channels-last, as one tiled Triton copy (PyTorch's
    generic strided copy took ~9 us per SD1.5 conv output on an H200, about 3x its bytes). ``channels_last``: a
    contiguous NCHW ``x`` in, channels-last out; else a channels-last ``x`` in, contiguous out. ``bias`` (C,): added
    per channel on the way, as ``x + bias.view(1, C, 1, 1)`` would (one rounding). ``launch_out`` receives a
    :class:`Launch` for ``launch(dev, x, out, x, bias or x, C, H*W)`` with the same shape."""
    if bias is not None and (bias.shape != (x.shape[1],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({x.shape[1]},) of {x.dtype}, got {tuple(bias.shape)} of {bias.dtype}")
    return _relayout(x, channels_last, None, None, launch_out, bias)


def _relayout(x, to_cl, x_scale, act_dtype, launch_out, bias=None):
    _check(x)
    src = torch.contiguous_format if to_cl else torch.channels_last
    if x.dim() != 4 or not x.is_contiguous(memory_format=src):
        want = "a contiguous NCHW" if to_cl else "a channels-last"
        raise ValueError(f"expected {want} tensor, got shape {tuple(x.shape)} strides {x.stride()}")
    triton = _kernels()[0]
    b, c, h, w = x.shape
    q = torch.empty_like(x, memory_format=torch.channels_last if to_cl else torch.contiguous_format)
    if x.numel():
        quant = x_scale is not None
        grid = (triton.cdiv(h * w, _CL_BLOCK_HW), triton.cdiv(c, _CL_BLOCK_C), b)
        consts = dict(QUANT=quant, TO_CL=to_cl, HAS_BIAS=bias is not None, CLAMP=_interpreting(),
                      FMAX=_FMAX[act_dtype] if quant else 0.0, ACT_E5M2=act_dtype == torch.float8_e5m2,
                      BLOCK_C=_CL_BLOCK_C, BLOCK_HW=_CL_BLOCK_HW)
        args = (x, q, x_scale if quant else x, bias if bias is not None else x, c, h * w)
        ck = _fast_launch(_relayout_kernel, grid, args, consts, 4)
        if launch_out is not None and ck is not None:
            launch_out.append(Launch(ck, grid, consts))
    return q


_CL_BLOCK_C, _CL_BLOCK_HW = 64, 64


def decode_weight(codes, k, table, w_scale=None, zero_point=None, x_scale=None, *, bits4, dtype, out=None,
                  launch_out=None, taps=1):
    """Triton version of :func:`decode_weight_reference`: uint8 codes ``(N, KP)`` -> ``(N, k)`` of ``dtype``.

    ``dtype=torch.uint8`` returns raw table entries (``table`` uint8, e.g. e4m3 bit patterns); otherwise ``table``
    is fp32 and the result is ``(table[code] - zero_point) * w_scale * x_scale`` (each optional) in ``dtype``.
    ``taps > 1``: each row is a conv filter ``(C, taps)`` (taps = KH*KW) and is written as ``(taps, C)``, i.e. the
    ``(N, KH, KW, C)`` memory of a channels-last weight (:func:`decode_weight_reference` rows transposed so).
    """
    _check(codes)
    triton, _, dk = _kernels()
    n, kp = codes.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=codes.device)
    if n == 0 or k == 0:
        return out
    if taps < 1 or k % taps:
        raise ValueError(f"taps={taps} must divide the row length {k}")
    raw = dtype == torch.uint8
    if w_scale is None and not raw:
        w_scale = torch.ones(1, dtype=torch.float32, device=codes.device)
    ws = w_scale if w_scale is not None else table  # placeholders keep the pointer arguments valid
    per_channel = (not raw) and w_scale is not None and w_scale.numel() > 1
    if taps > 1:
        if raw:
            raise ValueError("taps > 1 (a channels-last conv weight) needs a float dtype, not raw uint8 codes")
        c = k // taps
        block_c = min(256, max(64, triton.next_power_of_2(c)))  # 2-4 channels per thread
        grid = (n, triton.cdiv(c, block_c))
        args = (codes, table, ws, zero_point if zero_point is not None else ws, x_scale if x_scale is not None else ws,
                out, c, codes.stride(0), out.stride(0))
        consts = dict(TAPS=taps, BITS4=bits4, WS_PER_CHANNEL=per_channel, HAS_ZP=zero_point is not None,
                      FOLD_XS=x_scale is not None, BLOCK_C=block_c)
        ck = _fast_launch(_decode_taps_last_kernel, grid, args, consts, max(1, block_c // 128))
        if launch_out is not None and ck is not None:
            launch_out.append((Launch(ck, grid, consts), args))
        return out
    block_n, block_j = (16, 128) if bits4 else (16, 256)
    grid = (triton.cdiv(n, block_n), triton.cdiv(kp, block_j))
    args = (codes, table, ws, zero_point if zero_point is not None else ws, x_scale if x_scale is not None else ws,
            out, n, k, kp, codes.stride(0), out.stride(0))
    consts = dict(BITS4=bits4, RAW=raw, WS_PER_CHANNEL=per_channel,
                  HAS_ZP=(not raw) and zero_point is not None, FOLD_XS=(not raw) and x_scale is not None,
                  BLOCK_N=block_n, BLOCK_J=block_j)
    ck = _fast_launch(dk, grid, args, consts, 4)
    if launch_out is not None and ck is not None:
        launch_out.append((Launch(ck, grid, consts), args))
    return out


_CD_QBLOCK, _CD_BLOCK_N, _CD_BLOCK_J, _CD_WARPS = 2048, 16, 128, 4


def cast_and_decode4(x: torch.Tensor, x_scale: torch.Tensor, codes: torch.Tensor, k: int, lut8: torch.Tensor,
                     act_dtype=torch.float8_e4m3fn, *, launch_out=None):
    """Triton version of :func:`cast_and_decode4_reference` in one launch: ``(q, w)`` with ``q = fp8(x / x_scale)``
    (``x`` contiguous, ``q`` of its shape) and ``w`` the ``(N, k)`` uint8 table entries ``lut8[code]`` of the packed
    4-bit ``codes`` ``(N, ceil(k / 2))``. ``launch_out`` receives a :class:`Launch` for
    ``launch(dev, x, q, x_scale, *args)`` with ``args`` from :func:`cast_and_decode4_args`."""
    _check(x)
    if not x.is_contiguous():
        raise ValueError(f"cast_and_decode4 needs a contiguous activation, got strides {x.stride()}")
    triton = _kernels()[0]
    q = torch.empty_like(x, dtype=act_dtype)
    w = torch.empty((codes.shape[0], k), dtype=torch.uint8, device=codes.device)
    args, grid = cast_and_decode4_args(x.numel(), codes, lut8, w)
    consts = dict(CLAMP=_interpreting(), FMAX=_FMAX[act_dtype], ACT_E5M2=act_dtype == torch.float8_e5m2,
                  QBLOCK=_CD_QBLOCK, BLOCK_N=_CD_BLOCK_N, BLOCK_J=_CD_BLOCK_J)
    if grid[0]:
        ck = _fast_launch(_cast_decode4_kernel, grid, (x, q, x_scale, *args), consts, _CD_WARPS)
        if launch_out is not None and ck is not None:
            launch_out.append(Launch(ck, grid, consts))
    return q, w


def cast_and_decode4_args(numel: int, codes: torch.Tensor, lut8: torch.Tensor, w: torch.Tensor):
    """The arguments after ``(x, q, x_scale)`` of the fused launch writing ``w``, and its grid."""
    n, kp = codes.shape
    cast_progs = -(-numel // _CD_QBLOCK)
    cols = -(-kp // _CD_BLOCK_J)
    grid = (cast_progs + -(-n // _CD_BLOCK_N) * cols,)
    return (numel, codes, lut8, w, n, w.shape[1], kp, codes.stride(0), w.stride(0), cast_progs, cols), grid
