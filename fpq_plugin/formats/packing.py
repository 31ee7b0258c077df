"""Two 4-bit codes per byte.

Layout along the last dimension (the reduction dimension K of a weight)::

    byte j = [ hi nibble: code[2j+1] | lo nibble: code[2j] ]      bits 7..4 | 3..0

An odd K is padded with one code 0 (+0.0 in every FP format); ``unpack_nibbles`` takes the original length back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fpq_plugin.errors import FormatError


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in ``0..15`` of shape ``(..., K)`` into uint8 of shape ``(..., ceil(K / 2))``."""
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise FormatError("pack_nibbles: codes must lie in 0..15")
    c = codes.to(torch.uint8)
    if c.shape[-1] % 2:
        c = F.pad(c, (0, 1))
    pairs = c.unflatten(-1, (-1, 2))  # (..., K/2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 ``(..., ceil(K/2))`` -> uint8 codes ``(..., length)``."""
    if packed.dtype != torch.uint8:
        raise FormatError(f"unpack_nibbles: expected uint8, got {packed.dtype}")
    if packed.shape[-1] != (length + 1) // 2:
        raise FormatError(f"unpack_nibbles: {packed.shape[-1]} bytes cannot hold {length} codes")
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)[..., :length]
