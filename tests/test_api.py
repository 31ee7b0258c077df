"""quantize_ on a real (tiny) diffusers UNet and on plain module trees."""

from __future__ import annotations

import pytest
import torch
from helpers import sqnr_db
from torch import nn

import fpq_plugin as fpq
from fpq_plugin.errors import CancelledError, LayerQuantizationError
from fpq_plugin.models.unet_configs import build_unet, example_unet_inputs


@pytest.fixture(scope="module")
def tiny():
    unet = build_unet("tiny")
    inputs = example_unet_inputs(unet, batch=2)
    with torch.no_grad():
        reference = unet(**inputs).sample
    return unet, inputs, reference


def _fresh(tiny):
    unet, inputs, reference = tiny
    copy = build_unet("tiny")
    return copy, inputs, reference


def _count_float_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())


@pytest.mark.parametrize("recipe,min_sqnr", [("w8a8", 16), ("w8a16", 19), ("w4a8", 10), ("w4a16", 11), ("int8", 26), ("int4", 10)])
def test_every_layer_quantized_and_output_close(tiny, recipe: str, min_sqnr: float) -> None:
    unet, inputs, reference = _fresh(tiny)
    n_layers = _count_float_layers(unet)
    with torch.no_grad():
        report = fpq.quantize_(unet, recipe, calibration_fn=lambda m: m(**inputs))
        assert _count_float_layers(unet) == 0 and len(report.layers) == n_layers
        fpq.set_backend(unet, "reference")
        out = unet(**inputs).sample
    assert torch.isfinite(out).all()
    assert sqnr_db(reference, out) > min_sqnr


def test_skip_patterns_and_filter_keep_layers_float(tiny) -> None:
    unet, inputs, _ = _fresh(tiny)
    report = fpq.quantize_(
        unet,
        "w8a16",
        skip=["conv_in", "*.to_k"],
        layer_filter=lambda name, m: not name.startswith("time_embedding"),
    )
    assert isinstance(unet.conv_in, nn.Conv2d)
    assert isinstance(unet.time_embedding.linear_1, nn.Linear)
    assert all(name.endswith("to_k") or name in ("conv_in",) or name.startswith("time_embedding") for name in report.skipped)
    assert any(name.endswith("to_k") for name in report.skipped)
    assert not any(name.endswith("to_k") for name in report.layers)


def test_activation_recipe_without_calibration_says_how_to_fix(tiny) -> None:
    unet, _, _ = _fresh(tiny)
    with pytest.raises(LayerQuantizationError, match="calibration_fn=.*or use a weight-only recipe"):
        fpq.quantize_(unet, "w8a8")
    assert _count_float_layers(unet) > 0  # nothing was swapped


def test_hooks_removed_when_calibration_fails(tiny) -> None:
    unet, _, _ = _fresh(tiny)

    def broken(model):
        raise RuntimeError("sampler crashed")

    with pytest.raises(RuntimeError, match="sampler crashed"):
        fpq.quantize_(unet, "w8a8", calibration_fn=broken)
    assert all(not m._forward_pre_hooks for m in unet.modules())


def test_progress_and_cancellation(tiny) -> None:
    unet, inputs, _ = _fresh(tiny)
    seen = []

    def progress(done: int, total: int, name: str) -> None:
        seen.append((done, total, name))
        if done == 3:
            raise CancelledError("stop")

    with pytest.raises(CancelledError):
        fpq.quantize_(unet, "w8a16", progress=progress)
    assert [d for d, _, _ in seen] == [1, 2, 3]
    assert len(fpq.quantized_layers(unet)) == 3


def test_plain_module_tree_and_already_quantized_layers_are_left_alone() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Conv2d(2, 2, 1)))
    report = fpq.quantize_(model, "w4a16")
    assert len(report.layers) == 2
    again = fpq.quantize_(model, "w4a16")
    assert not again.layers  # quantized layers are not quantized twice


def test_backend_names_are_validated() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    fpq.quantize_(model, "w8a16")
    with pytest.raises(LayerQuantizationError, match="unknown backend"):
        fpq.set_backend(model, "cuda-magic")
