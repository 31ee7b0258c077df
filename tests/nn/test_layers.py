"""QLinear / QConv2d: built from float layers, reference arithmetic, geometry, meta construction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randn, sqnr_db
from torch import nn

from fpq_plugin.api import LayerPlan, build_quantized_layer, weight_matrix
from fpq_plugin.errors import LayerQuantizationError
from fpq_plugin.nn import QConv2d, QLinear
from fpq_plugin.quantizers import activation_params, quantize_weight

WEIGHT_FORMATS = ["e4m3fn", "e5m2", "e2m1", "e3m0", "e1m2", "e3m4", "int8", "int4"]


def _plan(module: nn.Module, weight_format: str, act_format: str | None, x: torch.Tensor) -> LayerPlan:
    qw = quantize_weight(weight_matrix(module), weight_format)
    if act_format is None:
        return LayerPlan(qw)
    scale, zp = activation_params(act_format, float(x.abs().max()) if act_format != "int8" else float(x.max()), float(x.min()))
    return LayerPlan(qw, act_format, scale, zp)


def _explicit(layer, module: nn.Module, x: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """Independent computation: fake-quantize both operands and run the float op."""
    w = plan.weight.dequantize().reshape(module.weight.shape)
    if plan.input_format is not None:
        from fpq_plugin.formats import get_format

        fmt = get_format(plan.input_format)
        s = torch.tensor(plan.input_scale)
        inv = torch.reciprocal(s)
        zp = plan.input_zero_point or 0.0
        x = (fmt.quantize(x * inv + zp) - zp) * s
    if isinstance(module, nn.Linear):
        return F.linear(x, w, module.bias)
    return F.conv2d(x, w, module.bias, module.stride, module.padding, module.dilation, module.groups)


@pytest.mark.parametrize("act", [None, "e4m3fn", "e5m2", "int8"])
@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_linear_reference_matches_explicit_fake_quant(fmt: str, act: str | None) -> None:
    torch.manual_seed(0)
    module = nn.Linear(33, 17)
    x = randn(4, 5, 33)
    plan = _plan(module, fmt, act, x)
    layer = build_quantized_layer(module, plan)
    layer.backend = "reference"
    y = layer(x)
    expected = _explicit(layer, module, x, plan)
    assert y.shape == (4, 5, 17)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    layer.backend = "dequant"
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert sqnr_db(module(x), y) > (25 if fmt in ("e4m3fn", "e3m4", "int8") else 8)


CONV_CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=3, padding=1, groups=4),
    dict(kernel_size=(3, 1), padding="same"),
    dict(kernel_size=3, bias=False),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("fmt,act", [("e4m3fn", "e4m3fn"), ("e2m1", "e4m3fn"), ("e3m0", None), ("int4", "int8")])
def test_conv_reference_matches_explicit_fake_quant(case: dict, fmt: str, act: str | None) -> None:
    torch.manual_seed(0)
    module = nn.Conv2d(8, 12, **case)
    x = randn(2, 8, 9, 9)
    plan = _plan(module, fmt, act, x)
    layer = build_quantized_layer(module, plan)
    for backend in ("reference", "dequant"):
        layer.backend = backend
        torch.testing.assert_close(layer(x), _explicit(layer, module, x, plan), rtol=1e-5, atol=1e-5)


def test_buffers_and_bytes() -> None:
    module = nn.Linear(64, 32)
    layer = build_quantized_layer(module, _plan(module, "e2m1", "e4m3fn", randn(2, 64)))
    sd = layer.state_dict()
    assert set(sd) == {"weight_codes", "weight_scale", "input_scale", "bias"}
    assert sd["weight_codes"].shape == (32, 32) and sd["weight_codes"].dtype == torch.uint8  # two codes per byte
    assert layer.quantized_bytes() == 32 * 32 + 32 * 4 + 4 + 32 * 4
    assert layer.weight.shape == (32, 64)  # dequantized view for code that reads .weight


def test_meta_construction_allocates_nothing() -> None:
    layer = QConv2d(320, 640, 3, "e4m3fn", "e4m3fn", padding=1, device="meta")
    assert all(t.is_meta for t in layer.state_dict().values())
    spec = layer.layer_spec()
    rebuilt = QConv2d.from_spec(spec)
    assert rebuilt.layer_spec() == spec
    lin = QLinear.from_spec(QLinear(7, 3, "int4", None, bias=False, device="meta").layer_spec())
    assert lin.bias is None and lin.weight_zero_point is not None


def test_unsupported_inputs_raise() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(LayerQuantizationError, match="padding_mode='reflect'"):
        build_quantized_layer(conv, _plan(conv, "e4m3fn", None, randn(1, 4, 5, 5)))
    with pytest.raises(LayerQuantizationError, match="divisible by groups"):
        QConv2d(6, 4, 3, "e4m3fn", groups=4)
    lin = nn.Linear(4, 4)
    plan = _plan(lin, "e4m3fn", "e4m3fn", randn(2, 4))
    plan.input_scale = None
    with pytest.raises(LayerQuantizationError, match="my.layer: the plan quantizes activations but has no input scale"):
        build_quantized_layer(lin, plan, name="my.layer")
    layer = build_quantized_layer(lin, _plan(lin, "e4m3fn", None, randn(2, 4)))
    with pytest.raises(LayerQuantizationError, match="weight-only"):
        layer.set_input_quantizer(1.0)
    layer.backend = "nope"
    with pytest.raises(LayerQuantizationError, match="unknown backend 'nope'"):
        layer(randn(2, 4))


def test_layers_move_and_cast_with_the_module() -> None:
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    layer = build_quantized_layer(lin, _plan(lin, "e4m3fn", "e4m3fn", randn(2, 16)))
    assert layer.bias.dtype == torch.bfloat16
    y = layer(randn(2, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("weight_format,act_format", [("e4m3fn", "e4m3fn"), ("int8", "int8"), ("e2m1", None)])
@pytest.mark.parametrize("cast", ["bf16", "half", "double"])
def test_casting_the_model_keeps_scales_and_zero_points_fp32_and_exact(weight_format, act_format, cast) -> None:
    """``unet.to(torch.bfloat16)`` after quantizing is what diffusers and ComfyUI users do; the scales must not be
    rounded to the model's dtype (the GPU kernels also require them fp32)."""
    lin = nn.Linear(16, 8)
    layer = build_quantized_layer(lin, _plan(lin, weight_format, act_format, randn(2, 16)))
    before = {n: b.clone() for n, b in layer.named_buffers() if b.is_floating_point()}
    assert before.keys() >= {"weight_scale"}
    layer = {"bf16": lambda m: m.to(torch.bfloat16), "half": nn.Module.half, "double": nn.Module.double}[cast](layer)
    for name, old in before.items():
        now = getattr(layer, name)
        assert now.dtype == torch.float32 and torch.equal(now, old), name
    assert layer.bias.dtype == {"bf16": torch.bfloat16, "half": torch.float16, "double": torch.float64}[cast]
