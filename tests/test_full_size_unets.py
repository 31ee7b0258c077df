"""The real SD1.5 and SDXL UNet configs (random weights, CPU): size, coverage, finiteness, closeness.

Tolerances (measured on these random-weight UNets at a 16x16 latent, batch 1; random weights compound errors through
the depth of the network far more than trained ones): output SQNR against the float model >= 15 dB for W8A8
(measured 18.5 dB on SD1.5) and >= 7 dB for 4-bit weights with FP8 activations (measured 9.6 dB on SD1.5).
The 4-bit runs use e2m1 with absmax scales so the test stays within minutes on two CPU cores; the size bound does
not depend on the format choice.
"""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import sqnr_db
from torch import nn

import fpq_plugin as fpq
from fpq_plugin.api import state_bytes
from fpq_plugin.models.unet_configs import build_unet, example_unet_inputs

pytestmark = pytest.mark.slow

CASES = [
    ("sd15", "w8a8", 0.51, 15.0),
    ("sd15", "w4a8", 0.28, 7.0),
    ("sdxl", "w8a8", 0.51, 15.0),
    ("sdxl", "w4a8", 0.28, 7.0),
]


@pytest.mark.parametrize("config,recipe_name,max_ratio,min_sqnr", CASES, ids=[f"{c}-{r}" for c, r, _, _ in CASES])
def test_full_size_unet(config: str, recipe_name: str, max_ratio: float, min_sqnr: float) -> None:
    unet = build_unet(config)
    bf16_bytes = sum(t.numel() * 2 for t in unet.state_dict().values())
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in unet.modules())
    inputs = example_unet_inputs(unet, batch=1, height=16, width=16)
    recipe = fpq.get_recipe(recipe_name)
    if recipe.weight_bits == 4:
        recipe = recipe.replace(weight_formats=("e2m1",), weight_scale_method="absmax")
    with torch.no_grad():
        reference = unet(**inputs).sample
        report = fpq.quantize_(unet, recipe, calibration_fn=lambda m: m(**inputs), backend="reference")
        gc.collect()
        assert len(report.layers) == n_layers and not report.skipped
        assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in unet.modules())
        ratio = state_bytes(unet) / bf16_bytes
        assert ratio <= max_ratio, f"quantized state is {ratio:.3f} of bf16"
        out = unet(**inputs).sample
    assert torch.isfinite(out).all()
    assert sqnr_db(reference, out) >= min_sqnr
