"""GPU backends for quantized layers, registered into :mod:`fpq_plugin.backends` by :func:`register_kernel_backends`.

``auto`` tries, in order (the first whose ``supports`` says yes runs the call):

``fp8`` (CUDA, compute capability >= 8.9: Ada, Hopper, Blackwell)
    Linear layers with FP8 activations and e4m3fn or FP4 (e2m1/e3m0/e1m2) weights on the FP8 tensor cores.
    ``method="cublas"`` (default where the shapes allow): one-pass Triton activation cast with the static scale,
    then ``torch._scaled_mm`` with the per-channel scale (times the activation scale) in its epilogue; 4-bit weights
    are first decoded into a transient fp8 ``(N, K)`` tensor. ``method="fused"``: the Triton kernel of
    :mod:`fpq_plugin.kernels.fp8_linear` that casts the activation while loading its tile (one launch, but slower
    on the device: see benchmarks/NOTES_GPU.md). Conv2d layers run the ``decode`` path below, or, with
    ``FP8_CONV_METHOD = "implicit_gemm"``, the FP8 implicit-GEMM kernel of :mod:`fpq_plugin.kernels.fp8_conv`
    (opt-in until it is measured on a GPU).
``decode`` (any CUDA GPU with Triton: Ampere and newer for bf16)
    Weights decoded per call (Triton, 16/256-entry table, per-channel scale and the activation scale folded in) into
    a transient tensor of the input's dtype; FP8 activations rounded through their grid in one Triton pass (the grid
    values are exact in bf16/fp16); then cuBLAS / cuDNN. Numerically the quantized layer up to the bf16 rounding of
    the decoded weight (2^-9 relative) and of the output. This is the W4A16/W8A16 path on GPUs without FP8.
``dequant`` (everything else, the CPU included): see :mod:`fpq_plugin.backends.dequant`.

Under ``torch.compile`` both GPU backends trace a pure-PyTorch version of the same arithmetic (no raw Triton
launches, which would break the graph): Inductor then fuses the activation cast into the producing op.

Per-layer state (decode tables, fp8 weight views, scale vectors) is built on first use and kept in a plain
attribute of the layer, keyed on the buffers' identity and version, so a reloaded or re-calibrated layer rebuilds it.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

from fpq_plugin.formats import FP8_COMPATIBLE_4BIT

logger = logging.getLogger(__name__)

_FP8 = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_FMAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
_FLOAT_X = (torch.bfloat16, torch.float16, torch.float32)

# "auto" | "cublas" | "fused": how the fp8 backend runs a Linear (benchmarks/bench_unet.py compares them).
FP8_LINEAR_METHOD = "auto"
# "decode" | "implicit_gemm": how the fp8 backend runs a Conv2d. "implicit_gemm" (fp8_conv: the activation cast
# fused into the A-tile gather, FP8 tensor cores) is 1.5-2.3x faster than decode per conv on channels-last inputs
# (H200, conv_kernels_h200.json) but made the UNet slower while it gathered NCHW activations in place; copying them to
# channels-last first brings the UNet level with decode, no better (unet_h200_igemm_clcopy.json: SD1.5 B2 15.38 vs
# 15.23 ms), so it stays opt-in (bench_unet.py's fpq_w8a8_igemm) until the producer writes channels-last fp8 itself.
FP8_CONV_METHOD = "decode"
# The decode path's 3x3 (any KH*KW > 1) bf16/fp16 convs on NCHW inputs: decode the weight and cast the activation
# straight into channels-last memory, so cuDNN's NHWC kernels get their layout without transposing input and weight
# per call (what a float NCHW model pays: 3.1 ms of SD1.5 B2's 12.1 ms graph on an H200). False: plain NCHW.
CONV_CHANNELS_LAST = True
# cuBLAS fp8 GEMMs with use_fast_accum: Hopper's fp8 tensor cores accumulate in a narrower-than-fp32 register and
# cuBLAS, by default, adds every few K-steps into fp32 on the CUDA cores, which costs GEMM throughput. Fast
# accumulation skips that promotion (torchao's float8 inference does the same). H200: SDXL B2's Linear GEMMs 13.0 ->
# 11.7 ms; max error vs the reference 3.5e-3 -> 7.0e-3 of max|y| at K = 1280-5120 (bench_linear_kernels.py), UNet
# output error vs the fp32 reference backend 0.0798 -> 0.0804 (bench_unet.py, results/unet_h200_fastacc.json).
FP8_FAST_ACCUM = True

_CAPABILITY: dict[int, tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, cached (tests monkeypatch this to fake a GPU)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(idx)
    if cap is None:
        cap = _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return cap


_TRITON: list[bool] = []


def _triton_ok() -> bool:
    if not _TRITON:  # asked once: find_spec is slow and not traceable
        from fpq_plugin.kernels import triton_available

        _TRITON.append(triton_available())
    return _TRITON[0]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------------------------
# Per-layer prepared state
# ----------------------------------------------------------------------------------------------------------------


def _key_tensors(layer) -> tuple:
    # read straight from the module's dicts: this runs on every call and nn.Module.__getattr__ is slow
    b = layer._buffers
    return (b.get("weight_codes"), b.get("weight_scale"), b.get("weight_zero_point"), b.get("input_scale"),
            layer._parameters.get("bias"))


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # no version counter (see _key)
        return -1


def _activation_version(x: torch.Tensor) -> int:
    """``x``'s in-place version, or -1 for a tensor made under ``torch.inference_mode`` (ComfyUI samples in it).
    Asking first is what makes this cheap: ``_version`` raising costs ~9 us a call, ~12 ms per SD1.5 forward. A
    Parameter wrapping an inference tensor has a counter but counts as inference here; it only shares less."""
    return -1 if x.is_inference() else _version(x)


def _key(layer) -> tuple:
    """Storage address + in-place version of every tensor the state is derived from (a new device, a reload or a
    requantized weight means a new tensor). The state holds these tensors, so no address is reused while it lives.

    Tensors made under ``torch.inference_mode`` (ComfyUI loads and runs models in it), and Parameters made there and
    moved outside it, have no version counter: they count by address alone, which is enough because fpq and
    ComfyUI replace a layer's tensors rather than write into them.
    """
    return tuple(None if t is None else (t.data_ptr(), _version(t)) for t in _key_tensors(layer))


def _key_still_holds(st: "_State", layer) -> bool:
    """``st.key == _key(layer)``, without asking a tensor known to have no version counter for its version again
    (the exception is the slow part): the same object at the same address has still none."""
    for t, old, entry in zip(_key_tensors(layer), st.key_tensors, st.key):
        if t is None or entry is None:
            if t is not None or entry is not None:
                return False
            continue
        ptr, ver = entry
        if t.data_ptr() != ptr:
            return False
        if ver < 0 and t is old:
            continue
        if _version(t) != ver:
            return False
    return True


class _State:
    """What a layer's fast paths need, built once from its buffers."""

    def __init__(self, layer):
        self.key = _key(layer)
        self.key_tensors = _key_tensors(layer)  # kept alive: their addresses are part of the key
        dev = layer.weight_codes.device
        wf = layer.weight_format
        self.bits4 = layer.packed
        self.k = layer.reduction
        self.n = layer.out_features
        # fp32 value of every code: the float decode table (16 or 256 entries; NaN codes never occur in weights)
        self.table = wf.code_values().to(dev)
        self.zp = layer.weight_zero_point
        self.ws = layer.weight_scale.reshape(-1).contiguous()
        self.xs = layer.input_scale
        # the scale as a Python float, for comparing layers without a device sync (None: not shareable; reading it
        # syncs, which a CUDA-graph capture forbids)
        self.xs_value = None
        if self.xs is not None and not (self.xs.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.xs_value = float(self.xs)
        self.act_dtype = _FP8.get(layer.input_format.name) if layer.input_format is not None else None
        self.bias = layer.bias
        self.bias_by_dtype: dict[torch.dtype, torch.Tensor] = {}
        # FP8 tensor-core operands (Linear with FP8-compatible weights only)
        self.w8 = None  # (N, K) float8_e4m3fn view of 8-bit codes
        self.lut8 = None  # uint8 (16,): e4m3 bit pattern of each 4-bit code
        if wf.name == "e4m3fn":
            self.w8 = layer.weight_codes.view(torch.float8_e4m3fn)
        elif wf.name in FP8_COMPATIBLE_4BIT:
            self.lut8 = self.table.to(torch.float8_e4m3fn).view(torch.uint8)
        if self.xs is not None:
            # _scaled_mm's rowwise epilogue: acc * scale_a[m] * scale_b[n], with scale_a = 1 and
            # scale_b = x_scale * w_scale[n], the same fp32 product the reference multiplies by
            self.scale_b = (self.xs.float() * self.ws).expand(self.n).reshape(1, self.n).contiguous()
        self.ones: dict[int, torch.Tensor] = {}
        self.plan = None  # fp8_linear.LinearPlan, made on the first fused call
        self.conv_w = None  # fp8_conv.PreparedConvWeight, made on the first implicit-GEMM call
        self.cublas_bad: set[int] = set()  # M values _scaled_mm refused
        # Cached direct kernel launches (qops.Launch), made by the first call of each kind: the eager UNet is
        # launch-bound on slow hosts, so a repeat call should cost a few C calls, not Triton's binder.
        self.q_launch: dict[tuple, object] = {}  # (numel, grid_out, dtype) or ("cl", ...) -> activation-cast launch
        self.dec_launch: dict[tuple, tuple] = {}  # (out dtype, taps) -> (launch, args before out, args after out)
        self.dev = dev.index if dev.type == "cuda" else None

    def bias_as(self, dtype):
        if self.bias is None:
            return None
        b = self.bias_by_dtype.get(dtype)
        if b is None:
            b = self.bias_by_dtype[dtype] = self.bias.to(dtype)
        return b

    def ones_m(self, m: int, dev) -> torch.Tensor:
        o = self.ones.get(m)
        if o is None:
            o = self.ones[m] = torch.ones((m, 1), dtype=torch.float32, device=dev)
        return o


# layer -> _State; outside the module so that pickling, deepcopy and state_dict never see it
_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def release_state(layer) -> None:
    """Forget ``layer``'s prepared state (its tensors are freed with the layer's old ones)."""
    _STATES.pop(layer, None)


def _state(layer) -> _State:
    st = _STATES.get(layer)
    if st is None or not _key_still_holds(st, layer):
        st = _STATES[layer] = _State(layer)
    return st


# ----------------------------------------------------------------------------------------------------------------
# Pure-PyTorch versions (traced by torch.compile; also what the Triton paths are tested against)
# ----------------------------------------------------------------------------------------------------------------


# These read only the layer's buffers and ``layer.trace_spec`` (plain constants: see nn.base.TraceSpec), no
# per-layer state or weak dictionaries, so Dynamo traces them into one graph with cheap guards; Inductor fuses the
# decode and the activation cast into neighbouring kernels.


def _codes_torch(layer) -> torch.Tensor:
    codes = layer.weight_codes
    if layer.trace_spec.packed:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)[:, : layer.reduction]
    return codes


def _values_torch(layer, codes: torch.Tensor) -> torch.Tensor:
    """fp32 value of each code, from the format's bit fields (elementwise arithmetic, no table)."""
    spec = layer.trace_spec
    kind, name, e, m, bias = spec.weight_kind, spec.weight_name, spec.exp_bits, spec.man_bits, spec.bias
    if kind == "int":
        v = codes.float()
    elif name in _FP8:  # the hardware formats: a reinterpretation
        v = codes.view(_FP8[name]).float()
    else:  # specials "none" (FP4 grids, e3m4, e2m5): every code is a number
        c = codes.to(torch.int32)
        f = (c & ((1 << m) - 1)).float() * (2.0**-m)
        p = (c >> m) & ((1 << e) - 1)
        mag = torch.where(p == 0, f * (2.0 ** (1 - bias)), torch.exp2(p.float() - bias) * (1.0 + f))
        v = torch.where((c >> (e + m)) == 1, -mag, mag)
    if layer.weight_zero_point is not None:
        v = v - layer.weight_zero_point.reshape(-1, 1)
    return v


def _decode_float_torch(layer, dtype, fold_xs: bool) -> torch.Tensor:
    s = layer.weight_scale.reshape(-1, 1)
    if fold_xs:
        s = s * layer.input_scale
    return (_values_torch(layer, _codes_torch(layer)) * s).to(dtype)


def _decode_fp8_torch(layer) -> torch.Tensor:
    codes = layer.weight_codes
    if layer.trace_spec.weight_name == "e4m3fn":
        return codes.view(torch.float8_e4m3fn)
    return _values_torch(layer, _codes_torch(layer)).to(torch.float8_e4m3fn)  # FP4 values are exact in e4m3


def _quant_torch(x, layer):
    act = _FP8[layer.trace_spec.input_name]
    fmax = _FMAX[act]
    return (x.float() * torch.reciprocal(layer.input_scale)).clamp(-fmax, fmax).to(act)


def _fp8_linear_torch(layer, x: torch.Tensor) -> torch.Tensor:
    k, n = layer.reduction, layer.out_features
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    # rowwise-scaled _scaled_mm exists on CUDA only (torch 2.11's CPU build asserts per-tensor scales)
    if x.is_cuda and layer.trace_spec.input_name == "e4m3fn" and m % 16 == 0 and _cublas_shape_ok(m, n, k):
        # Epilogue acc * scale_a[m] * scale_b[n] with scale_a = x_scale (one fill, which Inductor fuses into the
        # activation cast) and scale_b = the per-channel weight scale as it is stored (a view: no kernel). The eager
        # path multiplies x_scale into scale_b instead; both are the reference's two fp32 products up to order.
        ws = layer.weight_scale
        scale_b = ws.reshape(1, n) if ws.numel() == n else ws.expand(n).reshape(1, n).contiguous()
        scale_a = layer.input_scale.reshape(1, 1).expand(m, 1).contiguous()
        y = torch._scaled_mm(_quant_torch(x2, layer), _decode_fp8_torch(layer).t(), scale_a=scale_a,
                             scale_b=scale_b, bias=bias, out_dtype=x.dtype, use_fast_accum=FP8_FAST_ACCUM)
        return y.reshape(*x.shape[:-1], n)
    return _decode_linear_torch(layer, x)


def _decode_linear_torch(layer, x):
    fold = layer.trace_spec.input_name is not None
    xq = _quant_torch(x, layer).to(x.dtype) if fold else x
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(xq, _decode_float_torch(layer, x.dtype, fold), bias)


def _decode_conv_torch(layer, x):
    fold = layer.trace_spec.input_name is not None
    xq = _quant_torch(x, layer).to(x.dtype) if fold else x
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    w = _decode_float_torch(layer, x.dtype, fold).reshape(layer.weight_shape)
    if x.is_cuda and x.dim() == 4:
        # cuDNN's bf16 convs run channels-last. Inductor makes a float model's conv weights channels-last, but it
        # leaves a weight computed in the graph (this decode) as it is written, so cuDNN paid a layout transpose
        # of weight and activation per conv (2.8 ms of an SDXL B2 forward). Asking for channels-last here makes
        # the decode kernel (and the activation's producer) write it directly.
        w = w.contiguous(memory_format=torch.channels_last)
        xq = xq.contiguous(memory_format=torch.channels_last)
    return F.conv2d(xq, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


# ----------------------------------------------------------------------------------------------------------------
# Eager launches through the per-layer cache
# ----------------------------------------------------------------------------------------------------------------

_qops = None


def _ops():
    global _qops
    if _qops is None:
        from fpq_plugin.kernels import qops

        _qops = qops
    return _qops


def _relayout(t: torch.Tensor, st: _State, to_cl: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` moved between NCHW and channels-last memory (``to_cl``: a contiguous NCHW ``t`` in, channels-last out,
    as fp8(t / x_scale) grid values for an FP8-activation layer; else a channels-last ``t`` in, NCHW out, values as
    they are, plus ``bias`` per channel when given) through the layer's cached launch."""
    b, c, h, w = t.shape
    quant = to_cl and st.act_dtype is not None
    key = ("relayout", to_cl, bias is not None, b, c, h * w, t.dtype)
    launch = st.q_launch.get(key)
    if launch is not None and t.data_ptr() % 16 == 0:
        out = torch.empty_like(t, memory_format=torch.channels_last if to_cl else torch.contiguous_format)
        launch(st.dev, t, out, st.xs if quant else t, bias if bias is not None else t, c, h * w)
        return out
    lo: list = []
    if quant:
        out = _ops().fake_quantize_grid_channels_last(t, st.xs, st.act_dtype, launch_out=lo)
    else:
        out = _ops().relayout(t, to_cl, bias=bias, launch_out=lo)
    if lo and t.data_ptr() % 16 == 0:
        st.q_launch[key] = lo[0]
    return out


def _to_nchw(y: torch.Tensor, st: _State, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A channels-last conv output copied to contiguous NCHW (the caller's layout), ``bias`` added on the way."""
    if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
        return _relayout(y, st, False, bias)
    y = y.contiguous()  # a no-op for what cuDNN returns here (1x1 spatial outputs are both layouts)
    return y if bias is None else y.add_(bias.view(1, -1, 1, 1))


# Activation casts shared between consecutive layers that read the same tensor with the same scale (an attention's
# to_q, to_k and to_v all cast one LayerNorm output: SDXL B2 makes 140 such casts per forward). One entry:
# (x, its version, scale value, act dtype, grid_out, the cast). Holding x keeps its memory from being reused, so an
# equal address, layout and version mean equal data. Tensors without a version counter (inference mode) share only
# a cast a producer offered (offer_cast: version None), and only once, by the next cast.
SHARE_ACTIVATION_CASTS = True
_LAST_CAST: list = [None]


def _shared_cast(x: torch.Tensor, st: _State, grid_out: bool):
    memo = _LAST_CAST[0]
    if memo is None or st.xs_value is None:
        return None
    mx, mver, mxs, mact, mgrid, q = memo
    if (mxs == st.xs_value and mact == st.act_dtype and mgrid == grid_out and mx.data_ptr() == x.data_ptr()
            and mx.shape == x.shape and mx.stride() == x.stride() and mx.dtype == x.dtype):
        ver = _activation_version(x)
        if mver is None and ver < 0:  # offered for one use
            _LAST_CAST[0] = None
            return q
        if ver == mver:
            return q
    return None


def _cast(x: torch.Tensor, st: _State, grid_out: bool) -> torch.Tensor:
    """fp8(x / x_scale), as fp8 or (grid_out) as grid values in x's dtype; same layout as x."""
    if SHARE_ACTIVATION_CASTS:
        q = _shared_cast(x, st, grid_out)
        if q is not None:
            return q
    q = _cast_once(x, st, grid_out)
    _remember_cast(x, st, grid_out, q)
    return q


def _remember_cast(x: torch.Tensor, st: _State, grid_out: bool, q: torch.Tensor) -> None:
    if SHARE_ACTIVATION_CASTS and st.xs_value is not None:
        ver = _activation_version(x)
        _LAST_CAST[0] = (x, ver, st.xs_value, st.act_dtype, grid_out, q) if ver >= 0 else None


def cast_ahead(layer, rows: int, k: int) -> _State | None:
    """The prepared state of ``layer`` when its next call, on a contiguous ``(rows, k)`` input, will make the fp8
    activation cast :func:`offer_cast` can supply (the ``fp8`` backend's cuBLAS path), else None. A producer that
    gets a state writes ``fp8(x / st.xs)`` of type ``st.act_dtype`` beside its output and offers it."""
    if not SHARE_ACTIVATION_CASTS or FP8_LINEAR_METHOD == "fused" or getattr(layer, "kind", None) != "linear":
        return None
    backend = layer.backend if layer.backend != "auto" else getattr(layer, "_fpq_auto_backend", None)
    if backend != Fp8Backend.name or torch.compiler.is_compiling():
        return None
    st = _state(layer)
    if (st.k != k or st.xs_value is None or st.act_dtype != torch.float8_e4m3fn
            or not _cublas_shape_ok(rows, st.n, st.k) or rows in st.cublas_bad):
        return None
    return st


def offer_cast(x: torch.Tensor, st: _State, q: torch.Tensor) -> None:
    """Hand the consumer of ``x`` (whose state :func:`cast_ahead` returned) its cast ``q``, made by the producer:
    ``x`` as the consumer will reshape it, ``(rows, K)``. Bits must be :func:`_cast_once`'s; the consumer checks
    address, layout, version and scale as for any shared cast."""
    if SHARE_ACTIVATION_CASTS and st.xs_value is not None:
        ver = _activation_version(x)
        _LAST_CAST[0] = (x, ver if ver >= 0 else None, st.xs_value, st.act_dtype, False, q)


def _cast_once(x: torch.Tensor, st: _State, grid_out: bool) -> torch.Tensor:
    """fp8(x / x_scale), as fp8 or (grid_out) as grid values in x's dtype; same layout as x."""
    n = x.numel()
    launch = st.q_launch.get((n, grid_out, x.dtype))
    if launch is not None and x.is_contiguous() and x.data_ptr() % 16 == 0:
        q = torch.empty_like(x) if grid_out else torch.empty(x.shape, dtype=st.act_dtype, device=x.device)
        launch(st.dev, x, q, st.xs, n)
        return q
    out: list = []
    fn = _ops().fake_quantize_grid if grid_out else _ops().quantize_fp8
    q = fn(x, st.xs, st.act_dtype, launch_out=out)
    if out and x.is_contiguous() and x.data_ptr() % 16 == 0:
        st.q_launch[(n, grid_out, x.dtype)] = out[0]
    return q


# Module-wide switch: a W4A8 Linear's activation cast and weight decode in one launch (benchmarks compare both). On
# an H100 it took W4A8's device time from 23.92 to 22.89 ms on SDXL B1 and 36.04 to 35.07 ms on SDXL B2.
MERGE_CAST_DECODE = True


def _cast_and_decode4(layer, st: _State, x2: torch.Tensor):
    """The fp8 operands of a 4-bit-weight Linear for cuBLAS: ``(_cast(x2), e4m3 bit patterns of the weight)``, in
    one launch unless the cast is shared or the input is not 16-byte aligned (then two)."""
    if not MERGE_CAST_DECODE or x2.data_ptr() % 16:
        return _cast(x2, st, False), _decode(layer, st, torch.uint8, False)
    shared = _shared_cast(x2, st, False) if SHARE_ACTIVATION_CASTS else None
    if shared is not None:
        return shared, _decode(layer, st, torch.uint8, False)
    n = x2.numel()
    hit = st.q_launch.get(("cast+decode4", n, x2.dtype))
    if hit is not None:
        launch, ints = hit
        q = torch.empty(x2.shape, dtype=st.act_dtype, device=x2.device)
        w = torch.empty((st.n, st.k), dtype=torch.uint8, device=x2.device)
        launch(st.dev, x2, q, st.xs, n, layer.weight_codes, st.lut8, w, *ints)
    else:
        lo: list = []
        q, w = _ops().cast_and_decode4(x2, st.xs, layer.weight_codes, st.k, st.lut8, st.act_dtype, launch_out=lo)
        if lo:
            args, _ = _ops().cast_and_decode4_args(n, layer.weight_codes, st.lut8, w)
            st.q_launch[("cast+decode4", n, x2.dtype)] = (lo[0], args[4:])
    _remember_cast(x2, st, False, q)
    return q, w


def _decode(layer, st: _State, dtype: torch.dtype, fold: bool, taps: int = 1) -> torch.Tensor:
    """The layer's weight decoded into a fresh (N, K) tensor: dtype uint8 = e4m3 bit patterns of 4-bit codes,
    else values with the scales (and, fold, the activation scale) applied. ``taps > 1`` (a conv's KH*KW): each row
    in (KH, KW, C) order, the memory of a channels-last weight."""
    hit = st.dec_launch.get((dtype, taps))
    out = torch.empty((st.n, st.k), dtype=dtype, device=layer.weight_codes.device)
    if hit is not None:
        launch, pre, post = hit
        launch(st.dev, *pre, out, *post)
        return out
    lo: list = []
    if dtype == torch.uint8:
        _ops().decode_weight(layer.weight_codes, st.k, st.lut8, bits4=True, dtype=dtype, out=out, launch_out=lo)
    else:
        _ops().decode_weight(layer.weight_codes, st.k, st.table, st.ws, st.zp, st.xs if fold else None,
                             bits4=st.bits4, dtype=dtype, out=out, launch_out=lo, taps=taps)
    if lo:
        launch, args = lo[0]
        st.dec_launch[(dtype, taps)] = (launch, args[:5], args[6:])
    return out


def _channels_last_conv(layer, st: _State, x: torch.Tensor) -> torch.Tensor:
    """The decode path's conv of a contiguous NCHW bf16/fp16 ``x`` with a KH*KW > 1 kernel, NCHW out.

    cuDNN's bf16/fp16 kernels are NHWC: handed NCHW input and weight it transposes both per call. Here the decode
    and the activation cast (or, weight-only, a copy) write channels-last themselves; the output goes back to NCHW (the
    caller's layout) through one tiled copy, the one transpose a float NCHW conv also pays, which also adds the bias
    (PyTorch adds a conv's bias to cuDNN's output in a pass of its own: 0.5 ms of SD1.5's forward on an H200)."""
    o, c, kh, kw = layer.weight_shape
    w = _decode(layer, st, x.dtype, st.act_dtype is not None, kh * kw).view(o, kh, kw, c).permute(0, 3, 1, 2)
    y = F.conv2d(_relayout(x, st, True), w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return _to_nchw(y, st, st.bias_as(x.dtype))


# ----------------------------------------------------------------------------------------------------------------
# decode backend
# ----------------------------------------------------------------------------------------------------------------


class DecodeBackend:
    """Per-call weight decode into the input's dtype + cuBLAS/cuDNN (any CUDA GPU)."""

    name = "decode"

    def available(self, x: torch.Tensor) -> str | None:
        """Why this machine cannot run the backend at all (None: it can)."""
        return None if _triton_ok() else "triton is not installed"

    def supports(self, layer, x: torch.Tensor) -> str | None:
        if not x.is_cuda:
            return f"input is on {x.device.type}, not a CUDA GPU"
        if x.dtype not in _FLOAT_X:
            return f"input dtype {x.dtype} is not bf16/fp16/fp32"
        if layer.input_format is not None and layer.input_format.name not in _FP8:
            return f"activation format {layer.input_format.name} is not FP8 (INT8 activations run on 'dequant')"
        if not _triton_ok():
            return "triton is not installed"
        return None

    def _weight(self, layer, st, dtype):
        return _decode(layer, st, dtype, st.act_dtype is not None)

    def _input(self, layer, st, x):
        if st.act_dtype is None:
            return x
        return _cast(x, st, True)

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        if _compiling():
            return _decode_linear_torch(layer, x)
        st = _state(layer)
        return F.linear(self._input(layer, st, x), self._weight(layer, st, x.dtype), st.bias_as(x.dtype))

    def conv2d(self, layer, x: torch.Tensor) -> torch.Tensor:
        if _compiling():
            return _decode_conv_torch(layer, x)
        st = _state(layer)
        _, c, kh, kw = layer.weight_shape
        if CONV_CHANNELS_LAST and kh * kw > 1 and layer.groups == 1 and x.dim() == 4 and c > 1 and \
                x.dtype in (torch.bfloat16, torch.float16) and x.is_contiguous():
            return _channels_last_conv(layer, st, x)
        w = self._weight(layer, st, x.dtype).view(layer.weight_shape)
        return F.conv2d(self._input(layer, st, x), w, st.bias_as(x.dtype), layer.stride, layer.padding,
                        layer.dilation, layer.groups)


# ----------------------------------------------------------------------------------------------------------------
# fp8 backend
# ----------------------------------------------------------------------------------------------------------------


def _cublas_shape_ok(m: int, n: int, k: int) -> bool:
    # torch._scaled_mm wants K and N multiples of 16 (16-byte rows of fp8); M is unrestricted here but a ragged M
    # (cross-attention K/V: 2 x 77 rows) is tried once and remembered if refused.
    return k % 16 == 0 and n % 16 == 0


class Fp8Backend:
    """FP8 tensor cores for Linear (sm_89+); Conv2d through the ``decode`` path."""

    name = "fp8"

    def __init__(self, decode: DecodeBackend):
        self._decode = decode
        self._conv_note = False

    def available(self, x: torch.Tensor) -> str | None:
        """Why this machine cannot run the backend at all (None: it can)."""
        cap = device_capability(x.device)
        if cap < (8, 9):
            return f"GPU compute capability {cap[0]}.{cap[1]} has no FP8 tensor cores (needs 8.9+)"
        return None if _triton_ok() else "triton is not installed"

    def supports(self, layer, x: torch.Tensor) -> str | None:
        if not x.is_cuda:
            return f"input is on {x.device.type}, not a CUDA GPU"
        cap = device_capability(x.device)
        if cap < (8, 9):
            return f"GPU compute capability {cap[0]}.{cap[1]} has no FP8 tensor cores (needs 8.9+)"
        if layer.input_format is None:
            return "weight-only layer (no activation quantizer): the FP8 tensor cores need FP8 activations"
        if layer.input_format.name not in _FP8:
            return f"activation format {layer.input_format.name} is not FP8"
        wf = layer.weight_format.name
        if wf != "e4m3fn" and wf not in FP8_COMPATIBLE_4BIT:
            return f"weight format {wf} has no FP8 tensor-core path (e4m3fn, e2m1, e3m0, e1m2 do)"
        if x.dtype not in _FLOAT_X:
            return f"input dtype {x.dtype} is not bf16/fp16/fp32"
        if not _triton_ok():
            return "triton is not installed"
        return None

    def conv2d(self, layer, x: torch.Tensor) -> torch.Tensor:
        if _compiling():
            return _decode_conv_torch(layer, x)
        # (string paddings, 'same' with even kernels being asymmetric, and grouped convolutions stay on decode)
        if FP8_CONV_METHOD == "implicit_gemm" and layer.groups == 1 and x.dim() == 4 and \
                not isinstance(layer.padding, str):
            return self._implicit_gemm_conv(layer, x)
        if not self._conv_note:
            self._conv_note = True
            logger.info("fpq: fp8 backend: Conv2d layers run the 'decode' path (bf16 convolution on FP8-rounded "
                        "inputs); FP8_CONV_METHOD='implicit_gemm' selects the FP8 implicit-GEMM kernel")
        return self._decode.conv2d(layer, x)

    def _implicit_gemm_conv(self, layer, x: torch.Tensor) -> torch.Tensor:
        from fpq_plugin.kernels import fp8_conv

        st = _state(layer)
        if st.conv_w is None:
            st.conv_w = fp8_conv.prepare_conv_weight(layer.weight_codes, layer.weight_shape[1],
                                                     layer.weight_shape[2:], st.table if st.bits4 else None)
        out_format = None
        if x.shape[1] > 1 and not x.is_contiguous(memory_format=torch.channels_last):
            # The kernel gathers A tiles along channels: on NCHW activations (what diffusers' GroupNorm returns)
            # those reads are H*W elements apart. One channels-last copy in, NCHW out, as cuDNN does internally.
            x, out_format = x.contiguous(memory_format=torch.channels_last), torch.contiguous_format
        return fp8_conv.fp8_conv2d(x, st.conv_w, st.ws, st.xs, st.bias_as(x.dtype), stride=layer.stride,
                                   padding=layer.padding, dilation=layer.dilation, act_dtype=st.act_dtype,
                                   out_memory_format=out_format)

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        if _compiling():
            return _fp8_linear_torch(layer, x)
        st = _state(layer)
        k = st.k
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        use_cublas = (
            FP8_LINEAR_METHOD != "fused" and st.act_dtype == torch.float8_e4m3fn and _cublas_shape_ok(m, st.n, k)
            and m not in st.cublas_bad
        )
        if use_cublas:
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            w = st.w8
            if w is None:  # 4-bit codes: decoded to e4m3 for this call
                q, w = _cast_and_decode4(layer, st, x2)
                w = w.view(torch.float8_e4m3fn)
            else:
                q = _cast(x2, st, False)
            try:
                y = torch._scaled_mm(q, w.t(), scale_a=st.ones_m(m, x.device), scale_b=st.scale_b,
                                     bias=st.bias_as(x.dtype), out_dtype=x.dtype, use_fast_accum=FP8_FAST_ACCUM)
            except RuntimeError as e:  # a shape cuBLAS/CUTLASS refuses: remember, use the fused kernel for it
                st.cublas_bad.add(m)
                logger.info("fpq: fp8 backend: _scaled_mm refused M=%d N=%d K=%d (%s); using the fused kernel",
                            m, st.n, k, str(e).splitlines()[0])
            else:
                return y.reshape(*x.shape[:-1], st.n)
        if st.plan is None:
            from fpq_plugin.kernels.fp8_linear import LinearPlan

            st.plan = LinearPlan(layer.weight_codes, st.ws, st.xs, st.bias,
                                 weight_table=st.table if st.bits4 else None, act_dtype=st.act_dtype)
        return st.plan(x)


# ----------------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------------

_REGISTERED = False


def register_kernel_backends() -> None:
    """Add ``fp8`` and ``decode`` in front of ``dequant`` in the ``auto`` order (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from fpq_plugin.backends import AUTO_ORDER, register_backend
    from fpq_plugin.nn.base import ON_MOVE

    ON_MOVE.append(release_state)
    _triton_ok()  # answered now, in eager code: torch.compile cannot trace the import lookup behind it
    decode = DecodeBackend()
    register_backend(Fp8Backend(decode), auto_priority=0)
    register_backend(decode, auto_priority=AUTO_ORDER.index("fp8") + 1)
    _REGISTERED = True

