"""Weight statistics: exact zero counts on hand-made codes, FP vs INT sparsity, checkpoint == model, bad files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fpq_plugin as fpq
from fpq_plugin.errors import CheckpointError
from fpq_plugin.formats import get_format
from fpq_plugin.quantizers import QuantizedWeight
from fpq_plugin.stats import layer_stats


def _hand_made_layer() -> fpq.QLinear:
    """A 2x4 e2m1 layer whose codes are chosen by hand: 3 of its 8 dequantized weights are exactly zero."""
    fmt = get_format("e2m1")
    # e2m1 codes: 0 = +0, 8 = -0 (sign bit), 1 = 0.5, 2 = 1.0, 7 = 6.0, 15 = -6.0.
    codes = torch.tensor([[0, 1, 2, 8], [7, 15, 0, 1]], dtype=torch.uint8)
    layer = fpq.QLinear(4, 2, "e2m1", None, bias=True)
    layer.set_weight(QuantizedWeight(fmt, codes, torch.tensor([0.5, 2.0]), None))
    return layer


def test_counts_exact_zeros_including_negative_zero() -> None:
    model = nn.Sequential(_hand_made_layer(), nn.Linear(2, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 4.0]]))
    stats = layer_stats(model)
    assert [s.name for s in stats.layers] == ["0", "1"]
    q, f = stats.layers
    assert q.quantized and q.weight_format == "e2m1" and q.kind == "linear" and q.shape == (2, 4)
    assert (q.numel, q.zeros) == (8, 3) and q.sparsity == pytest.approx(3 / 8)
    # codes (2x4 nibbles -> 2x2 bytes) + fp32 scale (2) + fp32 bias (2)
    assert q.bytes == 4 + 8 + 8 and q.bf16_bytes == 2 * (8 + 2)
    assert not f.quantized and f.weight_format == "float32" and (f.numel, f.zeros) == (6, 2)
    assert stats.sparsity == pytest.approx(3 / 8) and stats.float_sparsity == pytest.approx(2 / 6)
    assert stats.format_counts() == {"e2m1": 1, "float32": 1}
    assert [s.name for s in layer_stats(model, include_float=False).layers] == ["0"]


def test_overall_sparsity_is_element_weighted() -> None:
    small = _hand_made_layer()  # 3 zeros of 8
    big = fpq.QLinear(8, 4, "e4m3fn", None, bias=False)  # codes all 0 -> 32 zeros of 32
    model = nn.Sequential(small, big)
    stats = layer_stats(model)
    assert stats.sparsity == pytest.approx((3 + 32) / (8 + 32))  # not the mean of 3/8 and 1


def _gaussian_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.SiLU(), nn.Linear(512, 256), nn.Conv2d(16, 32, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)  # bell-shaped, like trained weights (nn.Linear's default init is uniform)
    return model


def _calibrate(m: nn.Module) -> None:
    m[2](m[1](m[0](torch.randn(4, 256, generator=torch.Generator().manual_seed(1)))))
    m[3](torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("recipe", ["w4a16", "int4", "w8a16"])
def test_zeros_are_the_zero_codes(recipe) -> None:
    """Counted on the dequantized weight; checked here against the codes: value(code) - zero_point == 0."""
    model = _gaussian_mlp()
    fpq.quantize_(model, recipe, calibration_fn=_calibrate)
    stats = {s.name: s for s in layer_stats(model).layers}
    assert set(stats) == {"0", "2", "3"}
    for name, layer in fpq.quantized_layers(model).items():
        assert (layer.weight_scale > 0).all()
        assert stats[name].zeros == int((layer.weight_grid_values() == 0).sum())


def test_low_bit_weights_are_sparser() -> None:
    """Rounding to a coarse grid sends small weights to exactly 0: 4-bit >> 8-bit > float (0 zeros)."""
    sparsity = {}
    for recipe in ("w4a16", "int4", "w8a16"):
        model = _gaussian_mlp()
        fpq.quantize_(model, recipe, calibration_fn=_calibrate)
        sparsity[recipe] = layer_stats(model).sparsity
    float_stats = layer_stats(_gaussian_mlp())
    assert float_stats.float_sparsity == 0.0 and float_stats.sparsity == 0.0
    # Measured: w4a16 (e2m1) 9.5%, int4 13.4%, w8a16 (e4m3fn) 0.0% of the weights are exactly zero.
    assert sparsity["w4a16"] > 0.05 and sparsity["int4"] > 0.05, sparsity
    assert sparsity["w8a16"] < 0.01, sparsity


def test_checkpoint_gives_the_same_numbers_as_the_model(tmp_path) -> None:
    model = _gaussian_mlp()
    fpq.quantize_(model, "w4a8", calibration_fn=_calibrate)
    path = tmp_path / "m.fpq.safetensors"
    fpq.save_quantized(model, path, recipe="w4a8", model_fingerprint="sha256:" + "a" * 64, extra={"note": "x"})
    from_model, from_file = layer_stats(model), layer_stats(path)
    assert from_file.layers == from_model.layers
    assert from_file.total_bytes == fpq.state_bytes(model) == from_model.total_bytes
    assert from_file.header.recipe.name == "w4a8" and from_file.source == str(path)
    summary = json.loads(json.dumps(from_file.to_dict()))
    assert summary["model_fingerprint"] == "sha256:" + "a" * 64 and summary["extra"] == {"note": "x"}
    assert summary["sparsity"] == pytest.approx(from_model.sparsity)
    assert len(summary["layers"]) == 3 and {"name", "sparsity", "bytes", "shape"} <= set(summary["layers"][0])


def test_damaged_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path) -> None:
    model = _gaussian_mlp()
    fpq.quantize_(model, "w8a16")
    path = tmp_path / "m.fpq.safetensors"
    fpq.save_quantized(model, path, recipe="w8a16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        layer_stats(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        layer_stats(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError):
        layer_stats(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("recipe", ["w4a16", "int4", "w8a16", "int8"])
def test_code_shortcut_equals_dequantizing(recipe) -> None:
    from fpq_plugin.stats import _quantized_layer_stats

    model = _gaussian_mlp(seed=3)
    fpq.quantize_(model, recipe, calibration_fn=_calibrate)
    for name, layer in fpq.quantized_layers(model).items():
        assert _quantized_layer_stats(name, layer) == _quantized_layer_stats(name, layer, exact=True)


def test_code_shortcut_steps_aside_where_it_could_differ() -> None:
    from fpq_plugin.stats import _quantized_layer_stats, _zeros_from_codes

    layer = _hand_made_layer()
    assert _zeros_from_codes(layer) == 3
    layer.weight_scale = torch.tensor([0.0, 2.0])  # a zero scale zeroes a whole row
    assert _zeros_from_codes(layer) is None and _quantized_layer_stats("x", layer).zeros == 3 + 2
    layer.weight_scale = torch.tensor([1e-45, 2.0])  # 0.5 * 1e-45 underflows to 0 in fp32
    assert _zeros_from_codes(layer) is None
    assert _quantized_layer_stats("x", layer).zeros == _quantized_layer_stats("x", layer, exact=True).zeros
