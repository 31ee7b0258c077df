"""Every code of every FP format of 8 bits or fewer, against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from fpq_plugin.errors import FormatError
from fpq_plugin.formats import FORMATS, FPFormat, get_format

FP_FORMATS = [name for name, f in FORMATS.items() if f.kind == "fp"]

# Hand tables of the non-negative codes 0..7 (the sign bit makes codes 8..15 their negatives).
HAND_TABLES_4BIT = {
    "e2m1": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
    "e3m0": [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0],
    "e1m2": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5],
}


def independent_positive_grid(e: int, m: int, bias: float, specials: str) -> list[float]:
    """Grid built binade by binade (subnormal steps, then each exponent's 2^m values), not from bit fields."""
    values = [i * 2.0 ** (1 - bias - m) for i in range(2**m)]
    for p in range(1, 2**e):
        values += [(2**m + i) * 2.0 ** (p - bias - m) for i in range(2**m)]
    if specials == "ieee":
        values = values[: -(2**m)]
    elif specials == "fn":
        values = values[:-1]
    return values


@pytest.mark.parametrize("code", range(16))
@pytest.mark.parametrize("name", sorted(HAND_TABLES_4BIT))
def test_4bit_code_value(name: str, code: int) -> None:
    fmt = get_format(name)
    magnitude = HAND_TABLES_4BIT[name][code & 7]
    expected = -magnitude if code & 8 else magnitude
    value = fmt.decode_code(code)
    assert value == expected
    assert math.copysign(1.0, value) == (-1.0 if code & 8 else 1.0)  # signed zero too


@pytest.mark.parametrize("name,dtype", [("e4m3fn", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_8bit_hardware_codes_match_torch(name: str, dtype: torch.dtype) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    expected = codes.view(dtype).float()
    got = get_format(name).code_values()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    assert torch.equal(got[finite], expected[finite])
    assert torch.equal(torch.signbit(got[finite]), torch.signbit(expected[finite]))


@pytest.mark.parametrize("name", FP_FORMATS)
def test_grid_matches_independent_construction(name: str) -> None:
    fmt = get_format(name)
    expected = independent_positive_grid(fmt.exp_bits, fmt.man_bits, fmt.bias, fmt.specials)
    assert fmt.positive_grid().tolist() == expected
    assert fmt.max_value == expected[-1]


@pytest.mark.parametrize(
    "name,max_value", [("e4m3fn", 448), ("e5m2", 57344), ("e2m1", 6), ("e3m0", 16), ("e1m2", 3.5), ("e3m4", 31), ("e2m5", 7.875)]
)
def test_max_values(name: str, max_value: float) -> None:
    assert get_format(name).max_value == max_value


@pytest.mark.parametrize("name", FP_FORMATS)
def test_every_code_round_trips(name: str) -> None:
    fmt = get_format(name)
    codes = torch.arange(fmt.num_codes)
    values = fmt.code_values()
    finite = torch.isfinite(values)
    assert torch.equal(fmt.encode(values[finite]), codes[finite].to(torch.int32))


@pytest.mark.parametrize("name", FP_FORMATS)
def test_ties_round_to_even_code(name: str) -> None:
    fmt = get_format(name)
    grid = fmt.positive_grid().double()
    mids = ((grid[1:] + grid[:-1]) / 2).float()
    codes = fmt.encode(mids)
    lower = torch.arange(len(mids), dtype=torch.int32)
    expected = torch.where(lower % 2 == 0, lower, lower + 1)
    assert torch.equal(codes, expected)
    # Just off the midpoint goes to the nearer neighbour, whatever its parity.
    below = torch.nextafter(mids, torch.zeros_like(mids))
    above = torch.nextafter(mids, torch.full_like(mids, math.inf))
    assert torch.equal(fmt.encode(below), lower)
    assert torch.equal(fmt.encode(above), lower + 1)
    # Negative side mirrors the positive side with the sign bit set.
    assert torch.equal(fmt.encode(-mids), expected | (1 << (fmt.bits - 1)))


@pytest.mark.parametrize("name", FP_FORMATS)
def test_saturation_and_infinities(name: str) -> None:
    fmt = get_format(name)
    top = len(fmt.positive_grid()) - 1
    sign = 1 << (fmt.bits - 1)
    x = torch.tensor([fmt.max_value * 1.01, fmt.max_value * 1e6, math.inf, -math.inf, -fmt.max_value * 3])
    assert fmt.encode(x).tolist() == [top, top, top, top | sign, top | sign]


@pytest.mark.parametrize("name", FP_FORMATS)
def test_signed_zero(name: str) -> None:
    fmt = get_format(name)
    sign = 1 << (fmt.bits - 1)
    tiny = fmt.min_subnormal / 4
    assert fmt.encode(torch.tensor([0.0, -0.0, tiny, -tiny])).tolist() == [0, sign, 0, sign]
    assert torch.signbit(fmt.quantize(torch.tensor([-tiny])))[0]


def test_nan_handling() -> None:
    nan = torch.tensor([math.nan])
    assert get_format("e4m3fn").encode(nan).item() == 0x7F
    assert math.isnan(get_format("e5m2").decode(get_format("e5m2").encode(nan)).item())
    with pytest.raises(FormatError, match="no NaN code"):
        get_format("e2m1").encode(nan)


@pytest.mark.parametrize("name,dtype,scale", [("e4m3fn", torch.float8_e4m3fn, 300.0), ("e5m2", torch.float8_e5m2, 3e4)])
def test_random_values_match_torch_casts(name: str, dtype: torch.dtype, scale: float) -> None:
    fmt = get_format(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * scale
    x = torch.cat([x, torch.randn(50_000, generator=g) * fmt.min_normal])  # subnormal range
    x = x.clamp(-fmt.max_value, fmt.max_value)
    expected = x.to(dtype).view(torch.uint8)
    assert torch.equal(fmt.encode(x).to(torch.uint8), expected)
    assert torch.equal(fmt.encode_fast(x), expected)
    assert torch.equal(fmt.quantize(x), x.to(dtype).float())


@pytest.mark.parametrize("name", ["e2m1", "e3m0", "e1m2", "e3m4", "e2m5"])
def test_quantize_is_nearest_grid_value(name: str) -> None:
    fmt = get_format(name)
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1)) * fmt.max_value / 2
    q = fmt.quantize(x)
    signed_grid = torch.cat([fmt.positive_grid(), -fmt.positive_grid()])
    best = (x.clamp(-fmt.max_value, fmt.max_value)[:, None] - signed_grid[None]).abs().min(dim=1).values
    assert torch.equal((q - x.clamp(-fmt.max_value, fmt.max_value)).abs(), best)


def test_real_valued_bias_scales_the_grid() -> None:
    base = get_format("e2m1")
    shifted = base.with_bias(base.bias + 1.5)
    assert torch.allclose(shifted.positive_grid(), base.positive_grid() * 2.0**-1.5)
    assert shifted.torch_dtype is None
    x = torch.linspace(-5, 5, 1001)
    assert torch.allclose(shifted.quantize(x * 2**-1.5), base.quantize(x) * 2**-1.5)


def test_bad_formats_raise() -> None:
    with pytest.raises(FormatError, match="unknown number format 'e9m9'"):
        get_format("e9m9")
    with pytest.raises(FormatError, match="specials"):
        FPFormat("x", 2, 1, specials="weird")
    with pytest.raises(FormatError, match="exp_bits"):
        FPFormat("x", 0, 3)
    with pytest.raises(FormatError, match="finite"):
        FPFormat("x", 2, 1, bias=math.inf)


@pytest.mark.parametrize("name", ["e4m3fn", "e5m2"])
def test_devices_without_float8_round_the_same_way(name: str, monkeypatch) -> None:
    """Apple's MPS has no float8 dtypes: there quantize/encode_fast take the table path, which must agree with the
    torch-cast fast path bit for bit (saturation included). Simulated on the CPU by taking it off the list."""
    import fpq_plugin.formats.fp as fp

    fmt = get_format(name)
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(100_000, generator=g) * fmt.max_value / 4, torch.tensor([3 * fmt.max_value, -1e30])])
    fast_q, fast_codes = fmt.quantize(x), fmt.encode_fast(x)
    monkeypatch.setattr(fp, "_FP8_CAST_DEVICES", frozenset({"cuda"}))
    assert not fmt._cast_fast_path(x)
    assert torch.equal(fmt.quantize(x), fast_q)
    assert torch.equal(fmt.encode_fast(x), fast_codes)
