"""Integer grids for the INT baselines (Q-Diffusion style): unsigned codes with a zero point.

An ``IntFormat`` of ``b`` bits has codes ``0 .. 2^b - 1``; a quantized value is ``(code - zero_point) * scale``.
Asymmetric quantization (per-channel weights, per-tensor activations) picks ``scale`` and an integer ``zero_point``
from the observed range; the grid itself is just the integers, which is all this class describes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fpq_plugin.errors import FormatError


@dataclass(frozen=True)
class IntFormat:
    """Unsigned ``bits``-bit integer codes (used with a scale and a zero point)."""

    name: str
    bits: int

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise FormatError(f"format {self.name!r}: integer formats have 2 to 8 bits, got {self.bits}")

    @property
    def kind(self) -> str:
        return "int"

    @property
    def num_codes(self) -> int:
        return 1 << self.bits

    @property
    def qmax(self) -> int:
        return self.num_codes - 1

    @functools.cached_property
    def _table(self) -> torch.Tensor:
        return torch.arange(self.num_codes, dtype=torch.float32)

    def code_values(self) -> torch.Tensor:
        """fp32 tensor ``[0, 1, ..., 2^b - 1]``: value of each code before the zero point is subtracted."""
        return self._table.clone()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Round half to even and clamp to ``0..qmax``; ``x`` is already divided by the scale and shifted."""
        x = x.detach().float()
        if torch.isnan(x).any():
            raise FormatError(f"format {self.name!r}: the input holds NaN values")
        return torch.round(x).clamp(0, self.qmax).to(torch.int32)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x.detach().float()).clamp(0, self.qmax)

    def encode_fast(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x).to(torch.uint8)

    def __repr__(self) -> str:
        return f"IntFormat({self.name}: uint{self.bits} + zero point)"
