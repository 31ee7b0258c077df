"""Floating-point number formats as data: sign / exponent / mantissa, a real-valued exponent bias, and specials.

A format with ``e`` exponent bits, ``m`` mantissa bits and bias ``b`` represents (sign ``s``, exponent field ``p``,
mantissa field ``f``):

* normal   (``p >= 1``): ``(-1)^s * 2^(p - b) * (1 + f / 2^m)``
* subnormal (``p == 0``): ``(-1)^s * 2^(1 - b) * (f / 2^m)``

``specials`` says which codes are not finite numbers:

* ``"none"``: every code is a number (LLM-FP4's grids and the OCP FP4 ``e2m1`` element).
* ``"fn"``: only the all-ones exponent *and* mantissa is NaN, there is no infinity (``float8_e4m3fn``).
* ``"ieee"``: the all-ones exponent is reserved for infinities and NaNs (``float8_e5m2``).

The bias may be any real number (the "flexible bias" of the paper and of LLM-FP4). A real bias ``b`` is the same grid
as the integer bias ``b0`` scaled by ``2^(b0 - b)``, which is why quantized layers store a standard-bias format plus an
fp32 per-channel scale: the scale *is* the flexible bias, and the stored codes stay the hardware's bit patterns.

Codes are unsigned integers of ``1 + e + m`` bits laid out ``sign | exponent | mantissa`` (most significant first).
Encoding rounds to nearest with ties to the even code, saturates out-of-range values (infinities included) to the
largest finite value, keeps the sign of zero, and maps NaN to the NaN code where the format has one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from fpq_plugin.errors import FormatError

_SPECIALS = ("none", "fn", "ieee")
_FP8_CAST_DEVICES = frozenset({"cpu", "cuda"})  # devices whose torch builds have float8 dtypes


@dataclass(frozen=True)
class FPFormat:
    """A sign/exponent/mantissa floating-point format.

    Args:
        name: registry name, e.g. ``"e4m3fn"``.
        exp_bits: exponent bits ``e`` (>= 1).
        man_bits: mantissa bits ``m`` (>= 0).
        bias: exponent bias; real-valued. ``None`` means the IEEE-style default ``2^(e-1) - 1``.
        specials: ``"none"``, ``"fn"`` or ``"ieee"`` (see the module docstring).
        torch_dtype: the torch dtype with exactly this grid, if there is one (used as a fast path and as the
            independent reference in tests).
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: float | None = None
    specials: str = "none"
    torch_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.exp_bits < 1 or self.man_bits < 0 or self.bits > 16:
            raise FormatError(
                f"format {self.name!r}: need exp_bits >= 1, man_bits >= 0 and at most 16 bits in all, "
                f"got e={self.exp_bits}, m={self.man_bits}"
            )
        if self.specials not in _SPECIALS:
            raise FormatError(f"format {self.name!r}: specials must be one of {_SPECIALS}, got {self.specials!r}")
        if self.bias is None:
            object.__setattr__(self, "bias", float(2 ** (self.exp_bits - 1) - 1))
        if not math.isfinite(self.bias):
            raise FormatError(f"format {self.name!r}: bias must be a finite number, got {self.bias!r}")

    # ---- derived constants -------------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Total bits per value, sign included."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def num_codes(self) -> int:
        return 1 << self.bits

    @property
    def kind(self) -> str:
        return "fp"

    @functools.cached_property
    def max_value(self) -> float:
        """Largest finite value (a Python float computed once: layers read it in every forward, and a tensor ->
        float conversion there would break ``torch.compile`` graphs)."""
        return float(self._positive[-1])

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (the subnormal step)."""
        return 2.0 ** (1 - self.bias - self.man_bits)

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    def with_bias(self, bias: float) -> FPFormat:
        """The same format with another (real-valued) bias; loses the torch dtype unless the bias is unchanged."""
        dtype = self.torch_dtype if bias == self.bias else None
        return FPFormat(self.name, self.exp_bits, self.man_bits, float(bias), self.specials, dtype)

    # ---- code tables -------------------------------------------------------------------------------------------
    def decode_code(self, code: int) -> float:
        """Value of one code, computed from its bit fields (the definition every table is built from)."""
        if not 0 <= code < self.num_codes:
            raise FormatError(f"format {self.name!r}: code {code} outside 0..{self.num_codes - 1}")
        m, e = self.man_bits, self.exp_bits
        sign = -1.0 if code >> (e + m) else 1.0
        p = (code >> m) & ((1 << e) - 1)
        f = code & ((1 << m) - 1)
        top_exp = (1 << e) - 1
        if self.specials == "ieee" and p == top_exp:
            return sign * math.inf if f == 0 else math.nan
        if self.specials == "fn" and p == top_exp and f == (1 << m) - 1:
            return math.nan
        if p == 0:
            return sign * 2.0 ** (1 - self.bias) * (f / 2**m)
        return sign * 2.0 ** (p - self.bias) * (1 + f / 2**m)

    @functools.cached_property
    def _table(self) -> torch.Tensor:
        return torch.tensor([self.decode_code(c) for c in range(self.num_codes)], dtype=torch.float32)

    def code_values(self) -> torch.Tensor:
        """fp32 tensor of shape ``(2**bits,)``: value of every code (NaN/inf for specials)."""
        return self._table.clone()

    @functools.cached_property
    def _positive(self) -> torch.Tensor:
        half = self._table[: self.num_codes // 2]
        # Positive codes are monotonic in value; specials sit at the top, so the finite prefix is the grid.
        return half[torch.isfinite(half)].contiguous()

    def positive_grid(self) -> torch.Tensor:
        """Non-negative finite values in code order (index == code), fp32."""
        return self._positive.clone()

    @functools.cached_property
    def _nan_code(self) -> int | None:
        nan = torch.isnan(self._table[: self.num_codes // 2]).nonzero()
        return int(nan[-1]) if len(nan) else None

    @functools.cached_property
    def _midpoints(self) -> torch.Tensor:
        g = self._positive
        # Midpoints of adjacent grid values are exact in fp32 for every format of at most 22 mantissa bits.
        return ((g[1:] + g[:-1]) / 2).contiguous()

    @functools.cached_property
    def _rounding_boundaries(self) -> torch.Tensor:
        # Code i rounds up to i + 1 when |x| > mids[i]; on a tie it must go up only when i is odd (ties to the even
        # code). Lowering the odd midpoints by one ulp turns "> mid" into ">= mid" for exactly those, so a single
        # strict-count binary search (bucketize, right=False) rounds to nearest, ties to even.
        mids = self._midpoints.clone()
        odd = mids[1::2]
        mids[1::2] = torch.nextafter(odd, torch.zeros_like(odd))
        return mids

    # ---- encode / decode ---------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` (any float dtype) to the nearest code, ties to even; returns int32 codes of x's shape."""
        x = x.detach().float()
        mag = x.abs()
        code = torch.bucketize(mag, self._rounding_boundaries.to(x.device), out_int32=True)
        code |= torch.signbit(x).to(torch.int32) << (self.bits - 1)
        nan = torch.isnan(x)
        if nan.any():
            if self._nan_code is None:
                raise FormatError(f"format {self.name!r} has no NaN code; the input holds NaN values")
            code = torch.where(nan, torch.full_like(code, self._nan_code), code)
        return code

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """fp32 values of integer codes."""
        return self._table.to(codes.device)[codes.long()]

    def _cast_fast_path(self, x: torch.Tensor) -> bool:
        # torch's float8 dtypes exist on CPUs and CUDA GPUs only: Apple's MPS refuses them ("Trying to convert
        # Float8_e4m3fn to the MPS backend"), so elsewhere the table path below does the same rounding.
        return self.torch_dtype is not None and x.device.type in _FP8_CAST_DEVICES

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Round to the grid and return fp32 values (``decode(encode(x))``), with a fast path through torch's dtype."""
        x = x.detach().float()
        if self._cast_fast_path(x):
            # torch's casts are round-to-nearest-even; clamping first gives saturation (torch's e5m2 cast
            # overflows to inf, its e4m3fn cast saturates). Tests check this path against encode() bit for bit.
            limit = self.max_value
            return x.clamp(-limit, limit).to(self.torch_dtype).float()
        return self.decode(self.encode(x))

    def encode_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Like :meth:`encode` but through torch's dtype when there is one; returns uint8 codes (8-bit formats)."""
        if self._cast_fast_path(x):
            limit = self.max_value
            return x.detach().float().clamp(-limit, limit).to(self.torch_dtype).view(torch.uint8)
        return self.encode(x).to(torch.uint8 if self.bits <= 8 else torch.int32)

    def __repr__(self) -> str:
        return f"FPFormat({self.name}: e{self.exp_bits}m{self.man_bits}, bias={self.bias:g}, specials={self.specials})"
