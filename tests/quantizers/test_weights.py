from __future__ import annotations

import pytest
import torch
from helpers import randn

from fpq_plugin.errors import LayerQuantizationError
from fpq_plugin.formats import get_format
from fpq_plugin.quantizers import absmax_params, choose_weight_format, mse_params, quantize_weight


@pytest.mark.parametrize("name", ["e4m3fn", "e2m1", "e3m0", "e1m2"])
def test_absmax_maps_row_max_onto_format_max(name: str) -> None:
    w = randn(8, 64)
    qw = quantize_weight(w, name)
    fmt = get_format(name)
    deq = qw.dequantize()
    assert torch.allclose(deq.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6)
    assert (qw.codes.long() < fmt.num_codes).all()


def test_per_tensor_has_one_scale() -> None:
    qw = quantize_weight(randn(8, 64), "e4m3fn", granularity="tensor")
    assert qw.scale.shape == (1,)


@pytest.mark.parametrize("name", ["e2m1", "int4"])
def test_mse_search_never_worse_than_absmax(name: str) -> None:
    w = randn(16, 256)  # Gaussian rows: clipping the rare large values pays off
    err = {m: (quantize_weight(w, name, scale_method=m).dequantize() - w).pow(2).sum(1) for m in ("absmax", "mse")}
    assert (err["mse"] <= err["absmax"] + 1e-9).all()
    assert err["mse"].sum() < 0.95 * err["absmax"].sum()


def test_int_asymmetric_zero_point_represents_zero_exactly() -> None:
    w = randn(4, 32).abs() + 0.5  # all positive: range is [0, max]
    scale, zp = absmax_params(w, get_format("int8"))
    assert torch.equal(zp, torch.zeros(4))
    w2 = randn(4, 32)
    qw = quantize_weight(w2, "int8")
    assert ((qw.dequantize() - w2).abs() <= qw.scale[:, None] / 2 + 1e-6).all()


def test_zero_rows_encode_to_exact_zeros() -> None:
    w = torch.zeros(3, 16)
    for name in ("e4m3fn", "e2m1", "int4"):
        assert torch.equal(quantize_weight(w, name).dequantize(), w)


def test_choose_format_picks_lowest_error() -> None:
    # Powers of two are exactly e3m0's grid; a uniform grid is exactly e1m2's.
    signs = torch.where(randn(4, 64, seed=3) > 0, 1.0, -1.0)
    powers = signs * 2.0 ** torch.randint(-2, 5, (4, 64), generator=torch.Generator().manual_seed(1)).float()
    powers[:, 0] = 16.0
    assert choose_weight_format(powers, ("e2m1", "e3m0", "e1m2")).format.name == "e3m0"
    uniform = torch.randint(-7, 8, (4, 64), generator=torch.Generator().manual_seed(2)).float() * 0.5
    uniform[:, 0] = 3.5
    assert choose_weight_format(uniform, ("e2m1", "e3m0", "e1m2")).format.name == "e1m2"


def test_bad_weights_raise_with_layer_name() -> None:
    with pytest.raises(LayerQuantizationError, match="blocks.0.ff: the weight holds NaN"):
        quantize_weight(torch.tensor([[float("nan"), 1.0]]), "e2m1", layer="blocks.0.ff")
    with pytest.raises(LayerQuantizationError, match="2-D"):
        quantize_weight(torch.ones(2, 2, 2), "e2m1")
    with pytest.raises(LayerQuantizationError, match="scale_method"):
        quantize_weight(torch.ones(2, 2), "e2m1", scale_method="magic")


def test_mse_params_shapes() -> None:
    scale, zp = mse_params(randn(5, 40), get_format("int4"))
    assert scale.shape == (5,) and zp.shape == (5,)
