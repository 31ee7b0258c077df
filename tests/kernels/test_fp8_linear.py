"""fp8_linear: the reference against an independent float64 computation (CPU, always), and the Triton kernel
against the reference (CUDA sm_89+ only).

Bounds used for the kernel (measured on an H100, see benchmarks/NOTES_GPU.md):
* the fused activation cast is bit-identical to the reference's (identity weights, fp32 output, torch.equal);
* outputs: max|y - ref| <= tol(out_dtype, K) * max|ref| with tol = ulp + 1e-4 * sqrt(K), ulp = 2^-7 (bf16),
  2^-10 (fp16), 0 (fp32). The fp8 products are exact; the reference sums them in fp32, while Hopper's fp8 MMA
  (Triton's default, like cuBLAS "fast accumulation") adds them in a narrower accumulator and promotes to fp32
  only at the end. Measured on the UNet shapes: fp32-output error 7e-4 (K=320) to 4.8e-3 (K=5120) of max|ref|,
  i.e. under 0.7e-4 * sqrt(K); with promotion every 32-64 K (``imprecise_acc``) about 1e-4. The output dtype
  adds at most one unit in the last place of the largest element when the two fp32 sums straddle a rounding
  boundary.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "fpq_plugin" / "kernels" / "fp8_linear.py"


def _load():
    # By path, so that a half-written module elsewhere in fpq_plugin cannot break these tests.
    name = "_fpq_test_fp8_linear"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


fl = _load()
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2

# Output bound for the kernel, relative to max|ref| (see the module docstring).
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 0.0}


def tol(out_dtype: torch.dtype, k: int) -> float:
    return ULP[out_dtype] + 1e-4 * math.sqrt(k)

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
E1M2 = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, -0.0, -0.25, -0.5, -0.75, -1.0, -1.25, -1.5, -1.75]
E3M0 = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, -0.0, -0.25, -0.5, -1.0, -2.0, -4.0, -8.0, -16.0]
TABLES = {"e2m1": E2M1, "e1m2": E1M2, "e3m0": E3M0}


# ------------------------------------------------------------------------------------------------------------
# Independent helpers (no torch fp8 dtypes, no fp8_linear code)
# ------------------------------------------------------------------------------------------------------------


def pack_py(codes: list[list[int]]) -> torch.Tensor:
    """Pack rows of 4-bit codes byte by byte: byte j = code[2j] | code[2j+1] << 4, odd K padded with code 0."""
    rows = []
    for row in codes:
        r = list(row) + ([0] if len(row) % 2 else [])
        rows.append([r[2 * j] | (r[2 * j + 1] << 4) for j in range(len(r) // 2)])
    return torch.tensor(rows, dtype=torch.uint8)


def unpack_py(packed: torch.Tensor, k: int) -> list[list[int]]:
    out = []
    for row in packed.tolist():
        codes = []
        for byte in row:
            codes += [byte & 0xF, byte >> 4]
        out.append(codes[:k])
    return out


def decode_e4m3_bits(b: int) -> float:
    s, e, m = b >> 7, (b >> 3) & 0xF, b & 7
    if e == 15 and m == 7:
        return math.nan
    v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -v if s else v


def round_fp8_np(v: np.ndarray, mbits: int, emin: int, fmax: float) -> np.ndarray:
    """Round float64 values to an fp8 grid, nearest-even, after clamping to +-fmax (values already finite)."""
    v = np.clip(v, -fmax, fmax)
    a = np.abs(v)
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.maximum(e, emin)  # subnormals share the quantum of the smallest normal binade
    quantum = 2.0 ** (e - mbits)
    return np.sign(v) * np.round(a / quantum) * quantum  # np.round: half to even


def independent_linear(x, w_codes, w_scale, x_scale, bias, table, act_dtype, k):
    """float64 numpy: explicit weight decode, explicit fp8 rounding of the activation, float64 matmul."""
    if table is None:
        w = np.array([[decode_e4m3_bits(b) for b in row] for row in w_codes.tolist()], dtype=np.float64)
    else:
        w = np.array([[table[c] for c in row] for row in unpack_py(w_codes, k)], dtype=np.float64)
    xs = np.float32(x_scale.item())
    inv = np.float32(1.0) / xs  # fp32 reciprocal, as the definition says
    xv = x.float().numpy().astype(np.float32) * inv  # fp32 product, exact as float32 then widened
    if act_dtype == E4M3:
        q = round_fp8_np(xv.astype(np.float64), 3, -6, 448.0)
    else:
        q = round_fp8_np(xv.astype(np.float64), 2, -14, 57344.0)
    y = q.reshape(-1, k) @ w.T
    y = y * (np.float64(xs) * w_scale.double().numpy())
    if bias is not None:
        y = y + bias.double().numpy()
    return y.reshape(*x.shape[:-1], -1)


def random_case(m_shape, k, n, bits, x_dtype, per_channel, has_bias, seed, table="e2m1", device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*m_shape, k, generator=g)
    x[..., : max(1, k // 16)] *= 8  # a few large channels, as in real activations
    x = x.to(x_dtype)
    x_scale = torch.tensor(float(x.float().abs().amax()) / 448.0 * 0.7, dtype=torch.float32)  # some saturation
    if bits == 8:
        w = torch.randn(n, k, generator=g) * 0.05
        ws = (w.abs().amax(dim=1) / 448.0).clamp(min=1e-8)
        if not per_channel:
            ws = ws.amax().reshape(1)
        w_codes = (w / ws.reshape(-1, 1)).to(E4M3).view(torch.uint8)
        tab = None
    else:
        w_codes = pack_py(torch.randint(0, 16, (n, k), generator=g).tolist())
        ws = torch.rand(n if per_channel else 1, generator=g) * 0.01 + 0.001
        tab = torch.tensor(TABLES[table], dtype=torch.float32)
    bias = (torch.randn(n, generator=g) * 0.1).to(x_dtype) if has_bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(w_codes), to(ws.float()), to(x_scale), to(bias), to(tab)


# ------------------------------------------------------------------------------------------------------------
# CPU: the reference itself
# ------------------------------------------------------------------------------------------------------------


def test_nibble_order_and_unpack():
    codes = [[1, 2, 3, 4, 5], [15, 0, 7, 8, 9]]
    packed = pack_py(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x05], [0x0F, 0x87, 0x09]]
    assert fl.unpack_nibbles(packed, 5).tolist() == codes
    with pytest.raises(ValueError):
        fl.unpack_nibbles(packed, 7)  # 3 bytes cannot hold 7 codes


def test_dequantize_weight_8bit_matches_bit_decoding():
    codes = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    got = fl.dequantize_weight(codes, 64).flatten().tolist()
    want = [decode_e4m3_bits(b) for b in range(256)]
    for b, (g_, w_) in enumerate(zip(got, want)):
        assert (math.isnan(g_) and math.isnan(w_)) or g_ == w_, b


@pytest.mark.parametrize("table", sorted(TABLES))
def test_weight_table_lut(table):
    t = torch.tensor(TABLES[table])
    lut = fl.weight_table_to_e4m3_bits(t)
    assert [decode_e4m3_bits(b) for b in lut] == [float(v) for v in TABLES[table]]
    pw = fl.prepare_weight(pack_py([[0, 1, 2]]), t)
    pw2 = fl.prepare_weight(pack_py([[0, 1, 2]]), t.clone())  # deterministic
    assert pw.lut == pw2.lut == lut and (pw.lut32, pw.lut64) == (pw2.lut32, pw2.lut64)
    assert torch.equal(pw.codes, pw2.codes) and pw.bits == 4 and pw.n == 1
    for j in range(4):  # little-endian words
        assert [(pw.lut32[j] >> (8 * i)) & 0xFF for i in range(4)] == list(lut[4 * j : 4 * j + 4])
    for j in range(2):
        assert [(pw.lut64[j] >> (8 * i)) & 0xFF for i in range(8)] == list(lut[8 * j : 8 * j + 8])
    with pytest.raises(ValueError, match="exactly representable"):
        fl.weight_table_to_e4m3_bits(torch.tensor([0.0] * 15 + [0.3]))  # 0.3 is not an e4m3 value


@pytest.mark.parametrize("k", [9, 64])
def test_prepare_weight_expand_4bit_to_8bit(k):
    g = torch.Generator().manual_seed(k)
    codes = pack_py(torch.randint(0, 16, (5, k), generator=g).tolist())
    t = torch.tensor(E2M1)
    pw = fl.prepare_weight(codes, t, expand_to_k=k)
    assert pw.bits == 8 and pw.codes.shape == (5, k) and pw.codes.dtype == torch.uint8
    assert torch.equal(fl.dequantize_weight(pw.codes, k), fl.dequantize_weight(codes, k, t))


CPU_CASES = [
    # (lead shape, K, N, bits, x dtype, act dtype, per-channel w_scale, bias, table)
    ((3,), 16, 8, 8, torch.float32, E4M3, True, True, None),
    ((2, 3), 33, 5, 4, torch.bfloat16, E4M3, False, False, "e2m1"),
    ((4,), 31, 6, 4, torch.float16, E5M2, True, True, "e1m2"),
    ((5,), 40, 7, 8, torch.bfloat16, E5M2, False, True, None),
    ((1,), 9, 3, 4, torch.float32, E4M3, True, False, "e3m0"),
    ((2, 2, 2), 24, 4, 8, torch.float16, E4M3, True, False, None),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"K{c[1]}-N{c[2]}-w{c[3]}-{str(c[4])[6:]}-{str(c[5])[6:]}")
def test_reference_matches_independent_float64(case):
    lead, k, n, bits, xd, act, pc, hb, table = case
    x, w, ws, xs, b, tab = random_case(lead, k, n, bits, xd, pc, hb, seed=k * 31 + n, table=table or "e2m1")
    if bits == 8:
        tab = None
    ref = fl.fp8_linear_reference(x, w, ws, xs, b, weight_table=tab, act_dtype=act, out_dtype=torch.float32)
    ind = independent_linear(x, w, ws, xs, b, None if tab is None else tab.tolist(), act, k)
    assert ref.shape == (*lead, n)
    np.testing.assert_allclose(ref.double().numpy(), ind, rtol=1e-5, atol=1e-6 * float(np.abs(ind).max()))
    # default output dtype is x's
    assert fl.fp8_linear_reference(x, w, ws, xs, b, weight_table=tab, act_dtype=act).dtype == xd


def test_reference_activation_cast_matches_independent_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g) * 3, torch.tensor([1e6, -1e6, 1e-9, -3e-7, 0.0, 500.0])])
    xs = torch.tensor(0.0123)
    for act, (mb, emin, fmax) in ((E4M3, (3, -6, 448.0)), (E5M2, (2, -14, 57344.0))):
        xx = x * (100.0 if act == E5M2 else 1.0)
        q = fl.quantize_activation_reference(xx, xs, act).float().double().numpy()
        inv = np.float32(1.0) / np.float32(0.0123)
        want = round_fp8_np((xx.numpy().astype(np.float32) * inv).astype(np.float64), mb, emin, fmax)
        np.testing.assert_array_equal(q, want)


def test_kernel_refuses_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, ws, xs, b, _ = random_case((2,), 16, 8, 8, torch.bfloat16, True, True, seed=1)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        fl.fp8_linear(x, w, ws, xs, b)


# Logic check of the kernel on the CPU through Triton's interpreter (TRITON_INTERPRET=1 set for the whole run;
# the interpreter's fp32 -> fp8 cast is not round-to-nearest-even, so x is drawn on the fp8 grid here).
interp = pytest.mark.skipif(
    not (fl._interpreting() and importlib.util.find_spec("triton")),
    reason="set TRITON_INTERPRET=1 (and install triton) to run the kernel logic on the CPU",
)


@interp
@pytest.mark.parametrize("bits", [8, 4], ids=["w8", "w4"])
@pytest.mark.parametrize("mkn", [(5, 40, 24), (17, 33, 20), (3, 64, 16), (33, 256, 70)])
def test_kernel_logic_interpreter(bits, mkn):
    m, k, n = mkn
    x, w, ws, xs, b, tab = random_case((m,), k, n, bits, torch.float32, True, True, seed=m + k)
    x = (x / xs).clamp(-448, 448).to(E4M3).float() * xs  # exactly on the grid: no cast rounding involved
    tab = tab if bits == 4 else None
    ref = fl.fp8_linear_reference(x, w, ws, xs, b, weight_table=tab, out_dtype=torch.float32)
    for cfg in [(16, 16, 64, 2, 4, 1), (32, 32, 128, 2, 4, 1)]:
        for join in (False, True) if bits == 4 else (False,):
            for tma in (False, True) if k % 32 == 0 else (False,):
                out = fl.fp8_linear(x, w, ws, xs, b, weight_table=tab, out_dtype=torch.float32, config=cfg,
                                    w4_join=join, tma=tma)
                assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (cfg, join, tma)


# ------------------------------------------------------------------------------------------------------------
# CUDA sm_89+: the kernel against the reference
# ------------------------------------------------------------------------------------------------------------


def _has_sm89() -> bool:
    return (
        torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= (8, 9)
        and importlib.util.find_spec("triton") is not None
        and not fl._interpreting()
    )


def _rel_err(y, ref):
    assert not torch.isnan(y).any(), "NaN in kernel output"
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


GPU_SHAPES = [
    # (lead, K, N)
    ((1,), 320, 640),
    ((154,), 768, 320),
    ((2, 77), 2048, 640),  # 3-D input, cross-attention k/v
    ((130,), 1000, 333),  # ragged everything
    ((257,), 328, 200),
    ((64,), 33, 17),  # odd K
    ((2, 512), 640, 5120),  # large-M path
    ((1024,), 2560, 640),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _has_sm89(), reason="needs an sm_89+ CUDA GPU and triton; CI has none")
@pytest.mark.parametrize("bits", [8, 4], ids=["w8", "w4"])
@pytest.mark.parametrize(
    "shape,x_dtype", [(s, torch.bfloat16) for s in GPU_SHAPES] + [(GPU_SHAPES[i], torch.float16) for i in (0, 2, 3, 6)],
    ids=lambda v: "x".join(map(str, (*v[0], v[1], v[2]))) if isinstance(v, tuple) else str(v)[6:],
)
def test_kernel_matches_reference(bits, shape, x_dtype):
    lead, k, n = shape
    pc, hb = (k + n) % 2 == 0, k % 3 != 0
    x, w, ws, xs, b, tab = random_case(lead, k, n, bits, x_dtype, pc, hb, seed=k + n, device="cuda")
    tab = tab if bits == 4 else None
    pw = fl.prepare_weight(w, tab)
    for out_dtype in (None, torch.float32) if x_dtype == torch.bfloat16 else (None,):
        y = fl.fp8_linear(x, pw, ws, xs, b, out_dtype=out_dtype)
        ref = fl.fp8_linear_reference(x, w, ws, xs, b, weight_table=tab, out_dtype=out_dtype)
        assert y.shape == ref.shape == (*lead, n) and y.dtype == ref.dtype
        assert _rel_err(y, ref) <= tol(y.dtype, k), (out_dtype, _rel_err(y, ref))
    if x_dtype == torch.bfloat16 and k % 32 == 0 and torch.cuda.get_device_capability() >= (9, 0):  # TMA loads
        y = fl.fp8_linear(x, pw, ws, xs, b, tma=True)
        ref = fl.fp8_linear_reference(x, w, ws, xs, b, weight_table=tab)
        assert _rel_err(y, ref) <= tol(y.dtype, k)
    if bits == 4:  # decoded halves interleaved into one B tile instead of splitting A
        y = fl.fp8_linear(x, pw, ws, xs, b, w4_join=True)
        ref = fl.fp8_linear_reference(x, w, ws, xs, b, weight_table=tab)
        assert _rel_err(y, ref) <= tol(y.dtype, k)
    if bits == 4 and x_dtype == torch.bfloat16 and k in (33, 1000):  # the portable decoder gives the prmt one's bits
        y2 = fl.fp8_linear(x, pw, ws, xs, b, lut_mode="portable")
        assert torch.equal(y2, fl.fp8_linear(x, pw, ws, xs, b))


def test_fit_shared_memory_drops_stages_then_block_k():
    big = (128, 128, 128, 8, 8, 4)
    assert fl.fit_shared_memory(big, 2, 232448) == big  # bf16: 4 x (32 + 16) KB fits
    assert fl.fit_shared_memory(big, 4, 232448) == (128, 128, 128, 8, 8, 2)  # fp32: 4 x 80 KB does not
    assert fl.fit_shared_memory(big, 4, 100_000) == (128, 128, 64, 8, 8, 2)
    assert fl.fit_shared_memory((64, 256, 64, 8, 4, 3, 128), 4, 1000) == (64, 256, 32, 8, 4, 2, 128)
    assert fl.fit_shared_memory(big, 4, None) == big


@pytest.mark.gpu
@pytest.mark.skipif(not _has_sm89(), reason="needs an sm_89+ CUDA GPU and triton; CI has none")
@pytest.mark.parametrize("bits", [8, 4], ids=["w8", "w4"])
@pytest.mark.parametrize("mkn", [(8192, 1280, 1280), (8192, 320, 2560), (4096, 640, 5120)])
def test_float32_input_fits_shared_memory_with_the_large_tables(bits, mkn):
    """The tuned configs are for bf16 inputs; an fp32 input (a float32 pipeline) raised OutOfResources on an H200."""
    m, k, n = mkn
    x, w, ws, xs, b, tab = random_case((m,), k, n, bits, torch.float32, True, True, seed=m + k, device="cuda")
    tab = tab if bits == 4 else None
    y = fl.fp8_linear(x, fl.prepare_weight(w, tab), ws, xs, b)
    ref = fl.fp8_linear_reference(x, w, ws, xs, b, weight_table=tab)
    # fp32 output has no rounding slack, so the fp8 tensor cores' accumulation is all that differs; at these K it
    # measured up to 1.23x of tol's 1e-4 * sqrt(K) model (H200: 0.0044 at K=1280, 0.0028 at K=640); a wrong tile
    # or a cast gone wrong is off by orders of magnitude more.
    assert _rel_err(y, ref) <= 2 * tol(y.dtype, k)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_sm89(), reason="needs an sm_89+ CUDA GPU and triton; CI has none")
@pytest.mark.parametrize("bits", [8, 4], ids=["w8", "w4"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_activation_cast_bit_identical(bits, x_dtype, act, m=154):
    """Identity weights and fp32 output expose the fused cast: y = q * x_scale exactly, on both sides."""
    k = 256
    g = torch.Generator().manual_seed(m + k)
    fmax = 448.0 if act == E4M3 else 57344.0
    xs = torch.tensor(0.0173, dtype=torch.float32)
    x = torch.randn(m, k, generator=g) * (fmax * 0.0173 / 4)
    x[:, :8] *= 1e3  # beyond fmax * x_scale: saturates
    x[:, 8:16] *= 1e-6  # subnormal fp8 results and zeros
    if x_dtype != torch.float16:
        x[0, 16], x[0, 17] = float("inf"), float("-inf")
    x = x.to(x_dtype)
    if bits == 8:
        w = torch.eye(k).to(E4M3).view(torch.uint8)
        tab = None
    else:
        w = pack_py(torch.eye(k, dtype=torch.int64).mul(2).tolist())  # e2m1 code 2 = 1.0, code 0 = 0.0
        tab = torch.tensor(E2M1)
    x, w, xs = x.cuda(), w.cuda(), xs.cuda()
    tab = None if tab is None else tab.cuda()
    ws = torch.ones(1, device="cuda")
    y = fl.fp8_linear(x, w, ws, xs, weight_table=tab, act_dtype=act, out_dtype=torch.float32)
    ref = fl.fp8_linear_reference(x, w, ws, xs, weight_table=tab, act_dtype=act, out_dtype=torch.float32)
    assert torch.equal(y, ref), f"{(y != ref).sum().item()} of {y.numel()} differ"
    q = fl.quantize_activation(x, xs, act)
    assert torch.equal(q.view(torch.uint8), fl.quantize_activation_reference(x, xs, act).view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not _has_sm89(), reason="needs an sm_89+ CUDA GPU and triton; CI has none")
@pytest.mark.parametrize("bits", [8, 4], ids=["w8", "w4"])
def test_kernel_e5m2_and_precise_accumulation(bits):
    x, w, ws, xs, b, tab = random_case((300,), 1280, 640, bits, torch.bfloat16, True, True, seed=7, device="cuda")
    tab = tab if bits == 4 else None
    ref = fl.fp8_linear_reference(x, w, ws, xs, b, weight_table=tab, act_dtype=E5M2, out_dtype=torch.float32)
    y = fl.fp8_linear(x, w, ws, xs, b, weight_table=tab, act_dtype=E5M2, out_dtype=torch.float32)
    assert _rel_err(y, ref) <= tol(torch.float32, 1280)
    ref = fl.fp8_linear_reference(x, w, ws, xs, b, weight_table=tab, out_dtype=torch.float32)
    y = fl.fp8_linear(x, w, ws, xs, b, weight_table=tab, out_dtype=torch.float32, imprecise_acc=32)
    assert _rel_err(y, ref) <= 5e-4  # promoted accumulation: about 1e-4 measured


@pytest.mark.gpu
@pytest.mark.skipif(not _has_sm89(), reason="needs an sm_89+ CUDA GPU and triton; CI has none")
@pytest.mark.parametrize("bits", [8, 4], ids=["w8", "w4"])
def test_kernel_fast_launch_and_prequantized_input(bits, monkeypatch):
    """The cached-launch paths (fp8_linear's launch cache, LinearPlan) give the bits of Triton's own launch;
    fp8 x of act_dtype is taken as q."""
    x, w, ws, xs, b, tab = random_case((2, 150), 768, 320, bits, torch.bfloat16, True, True, seed=3, device="cuda")
    tab = tab if bits == 4 else None
    pw = fl.prepare_weight(w, tab)
    for tma in (False, None):
        monkeypatch.setattr(fl, "FAST_LAUNCH", False)
        y_slow = fl.fp8_linear(x, pw, ws, xs, b, tma=tma)
        monkeypatch.setattr(fl, "FAST_LAUNCH", True)
        y1 = fl.fp8_linear(x, pw, ws, xs, b, tma=tma)  # fills the launch cache
        y2 = fl.fp8_linear(x, pw, ws, xs, b, tma=tma)  # uses it
        assert torch.equal(y_slow, y1) and torch.equal(y1, y2)
        plan = fl.LinearPlan(w, ws, xs, b, weight_table=tab, tma=tma)
        for _ in range(3):  # first call: ordinary launch; then the plan's direct launch
            assert torch.equal(plan(x), y1)
        x_b = x[:, :140].contiguous() * 2  # other M (same config bucket) and data
        ref = fl.fp8_linear_reference(x_b, w, ws, xs, b, weight_table=tab)
        assert _rel_err(fl.fp8_linear(x_b, pw, ws, xs, b, tma=tma), ref) <= tol(torch.bfloat16, 768)
        for _ in range(2):
            assert _rel_err(plan(x_b), ref) <= tol(torch.bfloat16, 768)
        y0 = fl.fp8_linear(x[0], pw, ws, xs, b, tma=tma)
        assert torch.equal(plan(x[0]), y0) and torch.equal(plan(x[0]), y0)  # 2-D x
    q = fl.quantize_activation(x, xs)
    y_q = fl.fp8_linear(q, pw, ws, xs, b, tma=False)
    assert y_q.dtype == torch.bfloat16 and torch.equal(y_q, fl.fp8_linear(x, pw, ws, xs, b, tma=False))
