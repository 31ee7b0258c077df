from __future__ import annotations

import math

import pytest
import torch

from fpq_plugin.errors import FormatError
from fpq_plugin.formats import get_format


@pytest.mark.parametrize("name,bits", [("int8", 8), ("int4", 4)])
def test_every_code_round_trips(name: str, bits: int) -> None:
    fmt = get_format(name)
    codes = torch.arange(2**bits)
    assert torch.equal(fmt.encode(fmt.decode(codes)), codes.to(torch.int32))
    assert fmt.qmax == 2**bits - 1


def test_round_half_even_and_clamp() -> None:
    fmt = get_format("int4")
    x = torch.tensor([0.5, 1.5, 2.5, -3.0, 15.4, 15.6, 99.0])
    assert fmt.encode(x).tolist() == [0, 2, 2, 0, 15, 15, 15]


def test_nan_raises() -> None:
    with pytest.raises(FormatError, match="NaN"):
        get_format("int8").encode(torch.tensor([math.nan]))
