from __future__ import annotations

import pytest
import torch
from helpers import randn

from fpq_plugin.errors import LayerQuantizationError
from fpq_plugin.formats import get_format
from fpq_plugin.quantizers import activation_params, fake_quantize_activation


def test_fp_scale_maps_amax_to_format_max() -> None:
    scale, zp = activation_params("e4m3fn", 896.0)
    assert scale == 2.0 and zp is None


def test_int8_asymmetric_range() -> None:
    scale, zp = activation_params("int8", 3.0, -1.0)
    assert scale == pytest.approx(4.0 / 255) and zp == round(1.0 / scale)


def test_fake_quantize_matches_torch_cast_after_reciprocal_multiply() -> None:
    x = randn(1000, scale=10.0)
    s = torch.tensor(0.05)
    grid = fake_quantize_activation(x, get_format("e4m3fn"), s)
    expected = (x * torch.reciprocal(s)).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(grid, expected)


def test_non_finite_range_raises() -> None:
    with pytest.raises(LayerQuantizationError, match="not finite"):
        activation_params("e4m3fn", float("inf"), layer="x")
