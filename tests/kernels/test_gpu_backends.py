"""The ``fp8`` and ``decode`` backends and their kernels (:mod:`fpq_plugin.kernels.qops`) against the ``reference``
backend on random layers and inputs.

* CPU, always: the pure-PyTorch versions that ``torch.compile`` traces.
* CPU with ``TRITON_INTERPRET=1``: the Triton kernels' logic (the interpreter's fp32 -> fp8 conversion loses the
  carry into the next binade in ~1% of elements, so those checks accept exactly that defect).
* GPU (``-m gpu``; CI has none, so they skip with that reason): decode/cast kernels bit-identical to their
  references; every backend path within the bound below of the reference backend.

Bound, relative to max|ref| (the fp8 products are exact; the reference sums in fp32):
``fp8`` (cuBLAS or fused Triton, bf16/fp16 output): ``ulp(out) + 1e-4 * sqrt(K)`` as for ``fp8_linear``;
``decode``: the decoded weight is rounded once to bf16/fp16 (<= 2^-9 / 2^-12 relative per weight) before a
bf16/fp16 GEMM with fp32 accumulation, so ``2 * ulp(out) + 1e-4 * sqrt(K)``.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from fpq_plugin.backends import get_backend
from fpq_plugin.formats import get_format
from fpq_plugin.kernels import backend as kb
from fpq_plugin.kernels import qops
from fpq_plugin.nn import QConv2d, QLinear

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 0.0}
INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _has_sm89() -> bool:
    return (
        not INTERP
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= (8, 9)
        and importlib.util.find_spec("triton") is not None
    )


gpu = pytest.mark.gpu
needs_sm89 = pytest.mark.skipif(not _has_sm89(), reason="needs an sm_89+ CUDA GPU and triton; CI has none")
interp = pytest.mark.skipif(
    not INTERP or importlib.util.find_spec("triton") is None,
    reason="set TRITON_INTERPRET=1 (and install triton) to run the kernel logic on the CPU",
)


def random_codes(fmt, n, k, gen):
    f = get_format(fmt)
    codes = torch.randint(0, f.num_codes, (n, k), generator=gen, dtype=torch.int64)
    if f.kind == "fp":
        bad = ~torch.isfinite(f.code_values()[codes])
        codes[bad] = 1  # no NaN/inf codes in weights
    return codes.to(torch.uint8)


def make_layer(kind, w, a, *, n=96, c=64, k=3, stride=1, seed=0, device="cpu", bias=True, per_channel=True):
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        lyr = QLinear(c, n, w, a, bias=bias, bias_dtype=torch.bfloat16, per_channel=per_channel)
    else:
        lyr = QConv2d(c, n, k, w, a, stride=stride, padding=k // 2, bias=bias, bias_dtype=torch.bfloat16,
                      per_channel=per_channel)
    codes = random_codes(w, n, lyr.reduction, g)
    from fpq_plugin.formats import pack_nibbles

    lyr.weight_codes = pack_nibbles(codes) if lyr.packed else codes
    lyr.weight_scale = torch.rand(n if per_channel else 1, generator=g) / 8 + 0.01
    if lyr.weight_zero_point is not None:
        lyr.weight_zero_point = torch.randint(0, get_format(w).num_codes, (n,), generator=g).float()
    if bias:
        lyr.bias.data.copy_(torch.randn(n, generator=g))
    if a is not None:
        lyr.set_input_quantizer(3.0 / get_format(a).max_value)  # |x| > 3 saturates: the clamp is exercised
    return lyr.to(device)


def rel_max(y, ref):
    assert torch.isfinite(y).all()
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def x_for(lyr, shape_lead, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    if isinstance(lyr, QLinear):
        x = torch.randn(*shape_lead, lyr.in_features, generator=g)
    else:
        x = torch.randn(shape_lead[0], lyr.in_channels, 12, 10, generator=g)
    return x.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------------
# CPU, always: the traced (torch.compile) versions
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w", ["e4m3fn", "e2m1", "e3m0", "e1m2", "int4", "e3m4"])
@pytest.mark.parametrize("fold", [False, True])
def test_torch_decode_matches_layer_dequant(w, fold):
    lyr = make_layer("linear", w, "e4m3fn", n=24, c=37)
    got = kb._decode_float_torch(lyr, torch.float32, fold)
    want = lyr.weight_grid_values() * lyr.weight_scale[:, None] * (lyr.input_scale if fold else 1.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("w", ["e4m3fn", "e2m1", "e3m0", "e1m2"])
def test_torch_fp8_weight_is_exact(w):
    lyr = make_layer("linear", w, "e4m3fn", n=24, c=37)
    assert torch.equal(kb._decode_fp8_torch(lyr).float(), lyr.weight_grid_values())


def test_torch_activation_cast_matches_reference_grid():
    lyr = make_layer("linear", "e4m3fn", "e4m3fn")
    x = torch.randn(50, 64) * 2
    from fpq_plugin.quantizers import fake_quantize_activation

    want = fake_quantize_activation(x, lyr.input_format, lyr.input_scale)
    assert torch.equal(kb._quant_torch(x, lyr).float(), want)


@pytest.mark.parametrize("kind,w,a", [("linear", "e4m3fn", "e4m3fn"), ("linear", "e2m1", None),
                                      ("conv", "e3m0", "e4m3fn"), ("conv", "int4", None)])
def test_torch_decode_path_matches_reference(kind, w, a):
    lyr = make_layer(kind, w, a)
    x = x_for(lyr, (2, 5), torch.float32, "cpu")
    fn = kb._decode_linear_torch if kind == "linear" else kb._decode_conv_torch
    ref = getattr(get_backend("reference"), lyr.kind)(lyr, x)
    assert rel_max(fn(lyr, x), ref) < 1e-5


class _NoFormatObjects:
    def __getattr__(self, name):
        raise AssertionError(f"the traced path read Format.{name}; it must read layer.trace_spec (cheap guards)")


@pytest.mark.parametrize("kind,w,a", [("linear", "e4m3fn", "e4m3fn"), ("linear", "e2m1", "e4m3fn"),
                                      ("conv", "e3m0", "e4m3fn"), ("conv", "int4", None), ("linear", "e1m2", None)])
def test_traced_path_reads_plain_constants_not_format_objects(kind, w, a):
    """Dynamo guards a Format shared by many layers with Python identity checks on every compiled call; the
    traced path must get everything it needs from ``trace_spec`` and the buffers."""
    lyr = make_layer(kind, w, a)
    x = x_for(lyr, (2, 5), torch.float32, "cpu")
    fn = kb._decode_linear_torch if kind == "linear" else kb._decode_conv_torch
    want = fn(lyr, x)
    lyr.__dict__["weight_format"] = _NoFormatObjects()
    if a is not None:
        lyr.__dict__["input_format"] = _NoFormatObjects()
    assert torch.equal(fn(lyr, x), want)
    if a is not None:
        assert torch.equal(kb._quant_torch(x, lyr), kb._quant_torch(x.clone(), lyr))


# ------------------------------------------------------------------------------------------------------------
# CPU through the Triton interpreter
# ------------------------------------------------------------------------------------------------------------


@interp
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("w", ["e4m3fn", "e2m1", "int4", "e3m4"])
def test_interp_decode_kernel(w, per_channel):
    lyr = make_layer("linear", w, "e4m3fn", n=37, c=301, per_channel=per_channel)
    st = kb._State(lyr)
    got = qops.decode_weight(lyr.weight_codes, st.k, st.table, st.ws, st.zp, st.xs, bits4=st.bits4,
                             dtype=torch.float32)
    want = qops.decode_weight_reference(lyr.weight_codes, st.k, st.table, st.ws, st.zp, st.xs, bits4=st.bits4,
                                        dtype=torch.float32)
    assert torch.equal(got, want)
    if st.lut8 is not None:
        raw = qops.decode_weight(lyr.weight_codes, st.k, st.lut8, bits4=True, dtype=torch.uint8)
        assert torch.equal(raw.view(torch.float8_e4m3fn).float(), lyr.weight_grid_values())


@interp
@pytest.mark.parametrize("w", ["e4m3fn", "e2m1", "int4"])
def test_interp_decode_kernel_writes_a_channels_last_conv_weight(w):
    lyr = make_layer("conv", w, "e4m3fn", n=37, c=29, k=3)
    st = kb._State(lyr)
    args = (lyr.weight_codes, st.k, st.table, st.ws, st.zp, st.xs)
    got = qops.decode_weight(*args, bits4=st.bits4, dtype=torch.float32, taps=9)
    want = qops.decode_weight_reference(*args, bits4=st.bits4, dtype=torch.float32)
    # row n of the reference is (C, 3, 3); channels-last memory of the same weight is (3, 3, C)
    assert torch.equal(got, want.view(37, 29, 9).transpose(1, 2).reshape(37, -1))
    with pytest.raises(ValueError, match="taps=4 must divide"):
        qops.decode_weight(*args, bits4=st.bits4, dtype=torch.float32, taps=4)


@interp
@pytest.mark.parametrize("w", ["e2m1", "e1m2"])
@pytest.mark.parametrize("m,c", [(5, 301), (64, 640)])
def test_interp_cast_and_decode_in_one_launch(w, m, c):
    """A W4A8 layer's two cuBLAS operands from one launch: the same bytes as the two separate kernels."""
    lyr = make_layer("linear", w, "e4m3fn", n=37, c=c)
    st = kb._State(lyr)
    x = x_for(lyr, (m,), torch.bfloat16, "cpu")
    q, wbits = qops.cast_and_decode4(x, st.xs, lyr.weight_codes, st.k, st.lut8)
    assert torch.equal(wbits, qops.decode_weight(lyr.weight_codes, st.k, st.lut8, bits4=True, dtype=torch.uint8))
    assert torch.equal(wbits.view(torch.float8_e4m3fn).float(), lyr.weight_grid_values())
    assert torch.equal(q.view(torch.uint8), qops.quantize_fp8(x, st.xs).view(torch.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        qops.cast_and_decode4(x.t(), st.xs, lyr.weight_codes, st.k, st.lut8)


@interp
def test_interp_w4a8_operands_in_one_or_two_launches(monkeypatch):
    """The backend's W4A8 operand step: merged or not, the same bytes; a cast shared from the previous layer is
    used as it is (only the weight is decoded)."""
    lyr = make_layer("linear", "e2m1", "e4m3fn", n=48, c=96)
    st = kb._State(lyr)
    x = x_for(lyr, (8,), torch.bfloat16, "cpu")
    monkeypatch.setattr(kb, "_LAST_CAST", [None])
    monkeypatch.setattr(kb, "MERGE_CAST_DECODE", False)
    q2, w2 = kb._cast_and_decode4(lyr, st, x)
    monkeypatch.setattr(kb, "_LAST_CAST", [None])
    monkeypatch.setattr(kb, "MERGE_CAST_DECODE", True)
    q1, w1 = kb._cast_and_decode4(lyr, st, x)
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(w1, w2)
    q_again, w_again = kb._cast_and_decode4(lyr, st, x)  # same tensor, same scale: the remembered cast
    assert q_again is q1 and torch.equal(w_again, w1)


@interp
def test_interp_activation_cast_to_channels_last():
    x = torch.randn(2, 70, 9, 11, generator=torch.Generator().manual_seed(0)) * 3  # C, H*W: not multiples of 64
    xs = torch.tensor(0.01)
    got = qops.fake_quantize_grid_channels_last(x, xs)
    assert got.shape == x.shape and got.is_contiguous(memory_format=torch.channels_last)
    want = qops.fake_quantize_grid_reference(x, xs)
    bad = got != want  # the interpreter's carry defect (see test_interp_activation_cast), nothing else
    assert torch.equal(got[bad], want[bad] / 2) and float(bad.float().mean()) < 0.05
    with pytest.raises(ValueError, match="contiguous NCHW"):
        qops.fake_quantize_grid_channels_last(x.contiguous(memory_format=torch.channels_last), xs)


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_interp_relayout_is_the_memory_format_copy(dtype):
    x = (torch.randn(2, 70, 9, 11, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)  # C, H*W: not 64k
    cl = qops.relayout(x, True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)
    back = qops.relayout(cl, False)
    assert back.is_contiguous() and torch.equal(back, x)
    with pytest.raises(ValueError, match="channels-last tensor"):
        qops.relayout(x, False)
    with pytest.raises(ValueError, match="contiguous NCHW"):
        qops.relayout(cl, True)
    bias = (torch.randn(70) * 2).to(dtype)  # a conv's bias, added on the way back to NCHW
    with_bias = qops.relayout(cl, False, bias=bias)
    want = x + bias.view(1, -1, 1, 1)
    # the interpreter rounds fp32 -> bf16 toward zero, not to nearest: one bf16 ulp apart at most (exact on the GPU)
    tol = want.float().abs() * (2.0**-7 if dtype == torch.bfloat16 else 0.0)
    assert with_bias.is_contiguous() and bool(((with_bias.float() - want.float()).abs() <= tol).all())
    with pytest.raises(ValueError, match="bias must be"):
        qops.relayout(cl, False, bias=bias[:-1])


@interp
@pytest.mark.parametrize("w,a", [("e4m3fn", "e4m3fn"), ("e2m1", "e4m3fn"), ("e1m2", None)])
@pytest.mark.parametrize("stride", [1, 2])
def test_interp_channels_last_conv_path_equals_the_nchw_one(w, a, stride, monkeypatch):
    """bf16 3x3 convs decode and cast into channels-last memory; same numbers as the NCHW path, NCHW output."""
    lyr = make_layer("conv", w, a, k=3, stride=stride)
    x = x_for(lyr, (2,), torch.bfloat16, "cpu")
    got = kb.DecodeBackend().conv2d(lyr, x)
    monkeypatch.setattr(kb, "CONV_CHANNELS_LAST", False)
    want = kb.DecodeBackend().conv2d(lyr, x)
    assert got.is_contiguous() and got.shape == want.shape
    assert rel_max(got, want) < 1e-2  # the same bf16 operands; only the conv's summation order may differ


@interp
def test_interp_activation_cast():
    x = torch.randn(7, 333, generator=torch.Generator().manual_seed(2)) * 3
    xs = torch.tensor(0.01)
    got = qops.quantize_fp8(x, xs).float()
    want = qops.quantize_fp8_reference(x, xs).float()
    # The interpreter's fp32 -> fp8 conversion drops the carry when rounding up into the next binade (127.5 -> 64
    # instead of 128): accept exactly that defect, in a few percent of the elements, and nothing else.
    bad = got != want
    assert torch.equal(got[bad], want[bad] / 2)
    assert float(bad.float().mean()) < 0.05


@interp
@pytest.mark.parametrize("kind,w,a", [("linear", "e4m3fn", "e4m3fn"), ("linear", "e2m1", None),
                                      ("conv", "e4m3fn", "e4m3fn"), ("conv", "e1m2", None)])
def test_interp_decode_backend(kind, w, a, monkeypatch):
    lyr = make_layer(kind, w, a)
    x = x_for(lyr, (2, 5), torch.float32, "cpu")
    got = getattr(kb.DecodeBackend(), lyr.kind)(lyr, x)
    ref = getattr(get_backend("reference"), lyr.kind)(lyr, x)
    # logic check only: the interpreter's fp8 conversion halves ~1% of the activations (see above), which moves
    # single outputs by up to ~10% of max|ref|; a wrong index or layout gives errors of order 1
    assert rel_max(got, ref) < 0.2


@interp
@pytest.mark.parametrize("w", ["e4m3fn", "e2m1"])
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_interp_fp8_backend_implicit_gemm_conv(w, k, stride, channels_last, monkeypatch):
    """The backend hands the kernel a channels-last input (copying an NCHW one) and returns the input's layout."""
    monkeypatch.setattr(kb, "FP8_CONV_METHOD", "implicit_gemm")
    lyr = make_layer("conv", w, "e4m3fn", k=k, stride=stride)
    x = x_for(lyr, (2,), torch.float32, "cpu")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = kb.Fp8Backend(kb.DecodeBackend()).conv2d(lyr, x)
    ref = get_backend("reference").conv2d(lyr, x)
    assert got.shape == ref.shape and rel_max(got, ref) < 0.2  # logic check, as above
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)


# ------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------


@gpu
@needs_sm89
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("w", ["e4m3fn", "e2m1", "int4", "e3m4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_decode_kernel_bit_exact(w, dtype, per_channel):
    lyr = make_layer("linear", w, "e4m3fn", n=133, c=1283, device="cuda", per_channel=per_channel)
    st = kb._State(lyr)
    args = (lyr.weight_codes, st.k, st.table, st.ws, st.zp, st.xs)
    got = qops.decode_weight(*args, bits4=st.bits4, dtype=dtype)
    want = qops.decode_weight_reference(*args, bits4=st.bits4, dtype=dtype)
    assert torch.equal(got, want)
    if st.lut8 is not None:
        raw = qops.decode_weight(lyr.weight_codes, st.k, st.lut8, bits4=True, dtype=torch.uint8)
        assert torch.equal(raw.view(torch.float8_e4m3fn).float(), lyr.weight_grid_values())
    # a 3x3 conv weight written channels-last: row n in (3, 3, C) order
    conv = make_layer("conv", w, "e4m3fn", n=133, c=143, k=3, device="cuda", per_channel=per_channel)
    sc = kb._State(conv)
    cargs = (conv.weight_codes, sc.k, sc.table, sc.ws, sc.zp, sc.xs)
    got = qops.decode_weight(*cargs, bits4=sc.bits4, dtype=dtype, taps=9)
    want = qops.decode_weight_reference(*cargs, bits4=sc.bits4, dtype=dtype).view(133, 143, 9).transpose(1, 2)
    assert torch.equal(got, want.reshape(133, -1))


@gpu
@needs_sm89
@pytest.mark.parametrize("act", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_activation_casts_bit_exact(act, dtype):
    x = (torch.randn(37, 1001, device="cuda") * 4).to(dtype)
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), 1e30, -1e-30])
    xs = torch.tensor(0.013, device="cuda")
    q = qops.quantize_fp8(x, xs, act)
    assert torch.equal(q.view(torch.uint8), qops.quantize_fp8_reference(x, xs, act).view(torch.uint8))
    g = qops.fake_quantize_grid(x, xs, act)
    assert torch.equal(g, qops.fake_quantize_grid_reference(x, xs, act))
    xc = x.reshape(37, 7, 11, 13).to(memory_format=torch.channels_last)
    gc_ = qops.fake_quantize_grid(xc, xs, act)
    assert gc_.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gc_, qops.fake_quantize_grid_reference(xc, xs, act))
    xn = x.reshape(37, 7, 11, 13)  # NCHW in, channels-last out (the decode path's 3x3 convs)
    gcl = qops.fake_quantize_grid_channels_last(xn, xs, act)
    assert gcl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gcl, qops.fake_quantize_grid_reference(xn, xs, act))
    # the plain layout copies both ways (a weight-only conv's input, every channels-last conv's output)
    cl = qops.relayout(xn, True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, xn)
    back = qops.relayout(cl, False)
    assert back.is_contiguous() and torch.equal(back, xn)
    bias = torch.randn(xn.shape[1], device=xn.device).to(xn.dtype)
    assert torch.equal(qops.relayout(cl, False, bias=bias), xn + bias.view(1, -1, 1, 1))


@gpu
@needs_sm89
@pytest.mark.parametrize("w", ["e2m1", "e3m0", "e1m2"])
@pytest.mark.parametrize("act", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_gpu_cast_and_decode_bit_exact(w, act):
    lyr = make_layer("linear", w, "e4m3fn", n=133, c=1283, device="cuda")
    st = kb._State(lyr)
    x = (torch.randn(37, 1283, device="cuda") * 4).to(torch.bfloat16)
    q, wbits = qops.cast_and_decode4(x, st.xs, lyr.weight_codes, st.k, st.lut8, act)
    rq, rw = qops.cast_and_decode4_reference(x, st.xs, lyr.weight_codes, st.k, st.lut8, act)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(wbits, rw)


@gpu
@needs_sm89
@pytest.mark.parametrize("w", ["e2m1", "e1m2"])
@pytest.mark.parametrize("m,n,c", [(256, 320, 640), (154, 1280, 768)])
def test_gpu_w4a8_linear_is_the_same_with_one_or_two_launches(w, m, n, c, monkeypatch):
    kb.register_kernel_backends()
    lyr = make_layer("linear", w, "e4m3fn", n=n, c=c, device="cuda", seed=m)
    x = x_for(lyr, (m,), torch.bfloat16, "cuda")
    monkeypatch.setattr(kb, "MERGE_CAST_DECODE", True)  # the default; set so the test checks this path whatever it is
    one = [get_backend("fp8").linear(lyr, x) for _ in range(2)]  # the second call: the cached launch
    monkeypatch.setattr(kb, "MERGE_CAST_DECODE", False)
    two = get_backend("fp8").linear(lyr, x)
    assert torch.equal(one[0], two) and torch.equal(one[1], two)


LINEAR_CASES = [("e4m3fn", "e4m3fn"), ("e2m1", "e4m3fn"), ("e3m0", "e4m3fn"), ("e1m2", "e4m3fn"),
                ("e4m3fn", "e5m2"), ("e4m3fn", None), ("e2m1", None), ("int4", None)]


@gpu
@needs_sm89
@pytest.mark.parametrize("w,a", LINEAR_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["auto", "fused"])
@pytest.mark.parametrize("m,n,c", [(256, 320, 640), (154, 1280, 768), (3, 96, 80)])
def test_gpu_linear_backends_vs_reference(w, a, dtype, method, m, n, c, monkeypatch):
    monkeypatch.setattr(kb, "FP8_LINEAR_METHOD", method)
    kb.register_kernel_backends()
    lyr = make_layer("linear", w, a, n=n, c=c, device="cuda", seed=m + n)
    x = x_for(lyr, (m,), dtype, "cuda")
    ref = get_backend("reference").linear(lyr, x)
    name = "fp8" if get_backend("fp8").supports(lyr, x) is None else "decode"
    got = getattr(get_backend(name), "linear")(lyr, x)
    assert got.shape == ref.shape and got.dtype == dtype
    bound = (ULP[dtype] if name == "fp8" else 2 * ULP[dtype]) + 1e-4 * math.sqrt(c)
    assert rel_max(got, ref) <= bound, (name, rel_max(got, ref), bound)
    lyr.backend = "auto"
    assert torch.equal(lyr(x), got)  # auto picks the same backend


@gpu
@needs_sm89
@pytest.mark.parametrize("w,a", [("e4m3fn", "e4m3fn"), ("e2m1", "e4m3fn"), ("e1m2", None), ("int4", None)])
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_conv_backends_vs_reference(w, a, k, stride, channels_last):
    kb.register_kernel_backends()
    lyr = make_layer("conv", w, a, n=64, c=32, k=k, stride=stride, device="cuda")
    x = x_for(lyr, (2,), torch.bfloat16, "cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref = get_backend("reference").conv2d(lyr, x)
    got = lyr(x)
    assert torch.equal(lyr(x), got)  # the second call runs the cached launches
    bound = 2 * ULP[torch.bfloat16] + 1e-4 * math.sqrt(lyr.reduction)
    assert rel_max(got, ref) <= bound


@gpu
@needs_sm89
@pytest.mark.parametrize("w", ["e4m3fn", "e2m1", "e3m0"])
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_implicit_gemm_conv_vs_reference(w, k, stride, channels_last, monkeypatch):
    kb.register_kernel_backends()
    monkeypatch.setattr(kb, "FP8_CONV_METHOD", "implicit_gemm")
    lyr = make_layer("conv", w, "e4m3fn", n=64, c=32, k=k, stride=stride, device="cuda")
    x = x_for(lyr, (2,), torch.bfloat16, "cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref = get_backend("reference").conv2d(lyr, x)
    got = get_backend("fp8").conv2d(lyr, x)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert rel_max(got, ref) <= ULP[torch.bfloat16] + 1e-4 * math.sqrt(lyr.reduction)


@gpu
@needs_sm89
@pytest.mark.parametrize("w,a", [("e4m3fn", "e4m3fn"), ("e2m1", "e4m3fn"), ("e2m1", None)])
def test_gpu_compiled_path_matches_reference(w, a):
    kb.register_kernel_backends()
    torch._dynamo.reset()
    lin = make_layer("linear", w, a, n=256, c=512, device="cuda")
    conv = make_layer("conv", w, a, n=64, c=32, device="cuda", seed=3)
    x = x_for(lin, (128,), torch.bfloat16, "cuda")
    xc = x_for(conv, (2,), torch.bfloat16, "cuda")
    for lyr, inp in ((lin, x), (conv, xc)):
        ref = getattr(get_backend("reference"), lyr.kind)(lyr, inp)
        got = torch.compile(lyr, fullgraph=True)(inp)
        assert rel_max(got, ref) <= 2 * ULP[torch.bfloat16] + 1e-4 * math.sqrt(lyr.reduction)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("kind,w,a,name", [("linear", "e4m3fn", "e4m3fn", "fp8"), ("linear", "e2m1", "e4m3fn", "fp8"),
                                           ("linear", "e2m1", None, "decode"), ("conv", "e4m3fn", "e4m3fn", "fp8"),
                                           ("conv", "e1m2", None, "decode")])
def test_compiled_dispatch_traces_one_graph(kind, w, a, name, per_channel):
    """Under torch.compile the dispatcher uses the eager pick stored on the layer and the backends' pure-PyTorch
    paths: one graph, no breaks (fullgraph), same function as the reference (CPU; Dynamo only)."""
    kb.register_kernel_backends()
    lyr = make_layer(kind, w, a, n=64, c=64, per_channel=per_channel)
    lyr._fpq_auto_backend = name  # what an eager call on a GPU would have stored
    x = x_for(lyr, (32,), torch.float32, "cpu")
    torch._dynamo.reset()
    y = torch.compile(lyr, backend="eager", fullgraph=True)(x)
    assert rel_max(y, getattr(get_backend("reference"), lyr.kind)(lyr, x)) < 1e-5


@gpu
@needs_sm89
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gpu_offloading_a_layer_frees_its_memory(kind):
    """ComfyUI frees VRAM by moving a model to the CPU: after a forward (which prepares per-layer GPU state), the
    move must give back every byte the layer held on the GPU."""
    import gc

    kb.register_kernel_backends()

    def use_then_offload(seed: int) -> torch.nn.Module:
        lyr = make_layer(kind, "e4m3fn", "e4m3fn", n=512, c=512, seed=seed, device="cuda")
        shape = (4, 512) if kind == "linear" else (2, 512, 8, 8)
        lyr(torch.randn(shape, device="cuda", dtype=torch.bfloat16))
        lyr.to("cpu")
        gc.collect()
        torch.cuda.synchronize()
        return lyr  # kept alive, as ComfyUI keeps an offloaded model

    first = use_then_offload(0)  # the first use may keep library workspaces (cuBLAS) for good: not the layer's
    before = torch.cuda.memory_allocated()
    second = use_then_offload(1)
    assert torch.cuda.memory_allocated() == before, "the offloaded layer still holds GPU memory"
    assert first.weight_codes.device.type == second.weight_codes.device.type == "cpu"


@gpu
@needs_sm89
@pytest.mark.parametrize("kind,w,a", [("linear", "e4m3fn", "e4m3fn"), ("conv", "e4m3fn", "e4m3fn"),
                                      ("linear", "e2m1", None)])
def test_repeat_calls_use_the_cached_launches(kind, w, a):
    """After the first call a layer's Triton kernels are launched directly (the eager UNet is host-bound; going
    through Triton's binder each time cost ~100 us per layer on the lent H200)."""
    kb.register_kernel_backends()
    lyr = make_layer(kind, w, a, n=256, c=64, device="cuda")
    x = x_for(lyr, (128,) if kind == "linear" else (2,), torch.bfloat16, "cuda")
    first = lyr(x)
    again = lyr(x)
    st = kb._state(lyr)
    assert st.q_launch or st.dec_launch, "no cached launch: every call pays Triton's binder"
    if a is not None:
        assert st.q_launch
    if kind == "conv" or w != "e4m3fn":
        assert st.dec_launch
    assert torch.equal(first, again)
