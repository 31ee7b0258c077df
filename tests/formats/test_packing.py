from __future__ import annotations

import pytest
import torch

from fpq_plugin.errors import FormatError
from fpq_plugin.formats import pack_nibbles, unpack_nibbles


def test_nibble_order_is_low_then_high() -> None:
    packed = pack_nibbles(torch.tensor([[0x1, 0xA, 0xF]]))
    assert packed.tolist() == [[0xA1, 0x0F]]  # element 0 low, element 1 high; odd K padded with code 0


@pytest.mark.parametrize("k", [1, 2, 7, 64, 1153])
def test_round_trip(k: int) -> None:
    codes = torch.randint(0, 16, (5, k), generator=torch.Generator().manual_seed(k))
    packed = pack_nibbles(codes)
    assert packed.shape == (5, (k + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed, k), codes.to(torch.uint8))


def test_bad_inputs() -> None:
    with pytest.raises(FormatError, match="0..15"):
        pack_nibbles(torch.tensor([16]))
    with pytest.raises(FormatError, match="cannot hold"):
        unpack_nibbles(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(FormatError, match="uint8"):
        unpack_nibbles(torch.zeros(3, dtype=torch.int32), 6)
