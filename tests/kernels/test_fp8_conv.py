"""fp8_conv2d: the reference against fpq's QConv2d on the ``reference`` backend (CPU, always), the weight reorder,
and the implicit-GEMM Triton kernel against the reference: its logic under the Triton interpreter on the CPU
(``TRITON_INTERPRET=1``), its numerics on a CUDA sm_89+ GPU (same bound as fp8_linear's kernel: the fp8 products
are exact, the sums differ in order and, on Hopper, in the MMA's accumulator width)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from fpq_plugin.kernels import fp8_conv as fc
from fpq_plugin.kernels import fp8_linear as fl

E4M3 = torch.float8_e4m3fn
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 0.0}


def conv_case(b, c, h, w, n, k, bits, *, per_channel=True, has_bias=True, dtype=torch.float32, seed=0,
              on_grid=False, device="cpu"):
    """Random input, codes, scales and bias of a k x k convolution; ``on_grid`` puts x exactly on its fp8 grid
    with a power-of-two scale, so that x / x_scale is exact and no cast rounding is involved (Triton 3.x's
    interpreter casts values just below a power of two, e.g. 31.99999 -> fp8, to half that power)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    x[:, : max(1, c // 8)] *= 6  # a few large channels
    x_scale = torch.tensor(float(x.abs().amax()) / 448.0 * 0.8, dtype=torch.float32)
    if on_grid:
        x_scale = torch.exp2(torch.log2(x_scale).round())
        x = (x / x_scale).clamp(-448, 448).to(E4M3).float() * x_scale
    kk = c * k * k
    if bits == 8:
        wt = torch.randn(n, kk, generator=g) * 0.05
        ws = (wt.abs().amax(dim=1) / 448.0).clamp(min=1e-8)
        if not per_channel:
            ws = ws.amax().reshape(1)
        codes = (wt / ws.reshape(-1, 1)).to(E4M3).view(torch.uint8)
        table = None
    else:
        raw = torch.randint(0, 16, (n, kk + kk % 2), generator=g, dtype=torch.uint8)
        codes = (raw[:, 0::2] | (raw[:, 1::2] << 4)).contiguous()
        ws = torch.rand(n if per_channel else 1, generator=g) * 0.01 + 0.001
        table = torch.tensor(E2M1)
    bias = torch.randn(n, generator=g) * 0.1 if has_bias else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(x.to(dtype)), move(codes), move(ws.float()), move(x_scale), move(bias), move(table)


# ---- CPU: the reference ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("geometry", [(3, 1, 1), (3, 2, 1), (1, 1, 0)], ids=["3x3s1", "3x3s2", "1x1"])
def test_reference_is_the_quantized_conv_layer(bits, geometry) -> None:
    """fp8_conv2d_reference computes what QConv2d computes on fpq's 'reference' backend."""
    from fpq_plugin.nn import QConv2d

    k, stride, pad = geometry
    x, codes, ws, xs, bias, table = conv_case(2, 6, 9, 7, 5, k, bits, seed=k + stride)
    layer = QConv2d(6, 5, k, stride=stride, padding=pad, weight_format="e4m3fn" if bits == 8 else "e2m1",
                    input_format="e4m3fn", bias=True)
    layer.weight_codes = codes
    layer.weight_scale = ws
    layer.bias = torch.nn.Parameter(bias)
    layer.set_input_quantizer(float(xs))
    layer.backend = "reference"
    want = layer(x)
    got = fc.fp8_conv2d_reference(x, codes, (k, k), ws, xs, bias, stride=stride, padding=pad,
                                  weight_table=table)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prepared_weight_is_reordered_tap_major() -> None:
    codes = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).reshape(2, 12)  # (N, C*KH*KW) in (c, kh, kw) order
    pw = fc.prepare_conv_weight(codes, 3, 2)
    # element (n, r, s, c) of the prepared row = canonical (n, c, r, s)
    canonical = codes.reshape(2, 3, 2, 2)
    assert torch.equal(pw.codes.reshape(2, 2, 2, 3), canonical.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="needs 12"):
        fc.prepare_conv_weight(codes[:, :10], 3, 2)


def test_kernel_refuses_the_cpu(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, codes, ws, xs, bias, _ = conv_case(1, 4, 5, 5, 3, 3, 8)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        fc.fp8_conv2d(x, fc.prepare_conv_weight(codes, 4, 3), ws, xs, bias, padding=1)


# ---- Triton interpreter: the kernel's indexing on the CPU -----------------------------------------------------------
interp = pytest.mark.skipif(
    not (fl._interpreting() and importlib.util.find_spec("triton")),
    reason="set TRITON_INTERPRET=1 (and install triton) to run the kernel logic on the CPU",
)

CASES = [  # (B, C, H, W, N, k, stride, pad, dilation)
    (2, 5, 7, 6, 7, 3, 1, 1, 1),  # ragged channels and output channels, padding on every side
    (1, 40, 8, 8, 24, 3, 2, 1, 1),  # stride 2 (SD's downsamplers), C > BLOCK_K
    (2, 16, 5, 9, 20, 1, 1, 0, 1),  # 1x1 (SD's shortcuts and proj_in)
    (1, 8, 9, 9, 8, 3, 1, 2, 2),  # dilation
]


@interp
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_kernel_logic_interpreter(case, bits, layout) -> None:
    b, c, h, w, n, k, stride, pad, dil = case
    x, codes, ws, xs, bias, table = conv_case(b, c, h, w, n, k, bits, seed=sum(case), on_grid=True,
                                              per_channel=bits == 8, has_bias=c % 2 == 1 or bits == 4)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    kw = dict(stride=stride, padding=pad, dilation=dil)
    ref = fc.fp8_conv2d_reference(x, codes, k, ws, xs, bias, weight_table=table, **kw)
    pw = fc.prepare_conv_weight(codes, c, k, table)
    for config in [(16, 16, 32, 2, 4, 1), (32, 16, 64, 1, 4, 1)]:
        out = fc.fp8_conv2d(x, pw, ws, xs, bias, config=config, **kw)
        assert out.shape == ref.shape
        assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), config
    other = torch.contiguous_format if layout == "channels_last" else torch.channels_last
    out = fc.fp8_conv2d(x, pw, ws, xs, bias, config=(16, 16, 32, 2, 4, 1), out_memory_format=other, **kw)
    assert out.is_contiguous(memory_format=other) and (out - ref).abs().max() <= 1e-5 * ref.abs().max()


# ---- CUDA sm_89+ ----------------------------------------------------------------------------------------------------
def _has_sm89() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
            and importlib.util.find_spec("triton") is not None and not fl._interpreting())


GPU_CASES = [  # the convolutions of SD1.5 / SDXL (channels, spatial size at batch 2), plus ragged ones
    (2, 320, 64, 64, 320, 3, 1, 1),
    (2, 320, 64, 64, 320, 3, 2, 1),
    (2, 640, 32, 32, 1280, 3, 1, 1),
    (2, 1280, 16, 16, 1280, 1, 1, 0),
    (2, 4, 64, 64, 320, 3, 1, 1),  # conv_in
    (2, 320, 64, 64, 4, 3, 1, 1),  # conv_out
    (1, 33, 17, 19, 45, 3, 1, 1),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _has_sm89(), reason="needs an sm_89+ CUDA GPU and triton; CI has none")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference_on_gpu(case, bits, dtype) -> None:
    b, c, h, w, n, k, stride, pad = case
    x, codes, ws, xs, bias, table = conv_case(b, c, h, w, n, k, bits, dtype=dtype, seed=c + n, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last)
    ref = fc.fp8_conv2d_reference(x, codes, k, ws, xs, bias, stride=stride, padding=pad, weight_table=table)
    out = fc.fp8_conv2d(x, fc.prepare_conv_weight(codes, c, k, table), ws, xs, bias, stride=stride, padding=pad)
    err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert err <= ULP[dtype] + 1e-4 * math.sqrt(c * k * k), err


def test_default_config_follows_the_measured_shapes() -> None:
    """Small tiles where few output pixels exist, 128x256 for big 3x3 GEMMs, BLOCK_K never above C's bucket."""
    assert fc.default_conv_config(128, 1280, 2560, 9)[:2] == (64, 64)
    assert fc.default_conv_config(32768, 1280, 1280, 9)[:2] == (128, 256)
    assert fc.default_conv_config(8192, 320, 640, 1)[:2] == (64, 128)
    assert fc.default_conv_config(32768, 4, 320, 9)[:2] == (128, 64)
    for m, n, c, taps in [(32768, 320, 4, 9), (2048, 640, 32, 1), (8192, 640, 48, 9)]:
        assert fc.default_conv_config(m, n, c, taps)[2] == 32, "a channel count below 64 gets BLOCK_K = 32"
