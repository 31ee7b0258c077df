"""Number formats: FP grids (any exponent/mantissa split, real-valued bias) and the INT baselines.

``FORMATS`` maps a name to its format object; :func:`get_format` resolves names with a helpful error.
"""

from __future__ import annotations

import torch

from fpq_plugin.errors import FormatError
from fpq_plugin.formats.fp import FPFormat
from fpq_plugin.formats.integer import IntFormat
from fpq_plugin.formats.packing import pack_nibbles, unpack_nibbles

Format = FPFormat | IntFormat

# Hardware formats match torch's dtypes bit for bit; the others use the IEEE-style bias 2^(e-1)-1 and no specials.
E4M3FN = FPFormat("e4m3fn", 4, 3, specials="fn", torch_dtype=torch.float8_e4m3fn)  # max 448
E5M2 = FPFormat("e5m2", 5, 2, specials="ieee", torch_dtype=torch.float8_e5m2)  # max 57344
E2M1 = FPFormat("e2m1", 2, 1)  # OCP FP4 element: 0, .5, 1, 1.5, 2, 3, 4, 6
E3M0 = FPFormat("e3m0", 3, 0)  # powers of two 0.25 .. 16, and 0
E1M2 = FPFormat("e1m2", 1, 2)  # uniform 0 .. 3.5 in steps of 0.5
E3M4 = FPFormat("e3m4", 3, 4)  # research 8-bit, max 31
E2M5 = FPFormat("e2m5", 2, 5)  # research 8-bit, max 7.875
INT8 = IntFormat("int8", 8)
INT4 = IntFormat("int4", 4)

FORMATS: dict[str, Format] = {f.name: f for f in (E4M3FN, E5M2, E2M1, E3M0, E1M2, E3M4, E2M5, INT8, INT4)}

# Formats whose values are all exactly representable in float8_e4m3fn: they can feed FP8 tensor cores.
FP8_COMPATIBLE_4BIT = ("e2m1", "e3m0", "e1m2")
# Per-tensor activation formats. e3m4 / e2m5 are the paper's research encodings (its per-tensor 8-bit search runs
# over E5M2..E2M5): exact in simulation, no tensor-core path, so layers using them run on the dequant backend.
ACTIVATION_FORMATS = ("e4m3fn", "e5m2", "e3m4", "e2m5", "int8")
HARDWARE_FP8 = ("e4m3fn", "e5m2")
FP8_SEARCH_FORMATS = ("e4m3fn", "e5m2", "e3m4", "e2m5")


def get_format(name: str | Format) -> Format:
    """Look a format up by name (or pass a format object through)."""
    if isinstance(name, (FPFormat, IntFormat)):
        return name
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown number format {name!r}; known formats: {', '.join(FORMATS)}") from None


__all__ = [
    "ACTIVATION_FORMATS",
    "FP8_SEARCH_FORMATS",
    "HARDWARE_FP8",
    "FORMATS",
    "FP8_COMPATIBLE_4BIT",
    "FPFormat",
    "Format",
    "IntFormat",
    "get_format",
    "pack_nibbles",
    "unpack_nibbles",
]
