"""Run inside ComfyUI's Python (see test_comfy_blocks.py): the method on a small ComfyUI UNetModel."""

from __future__ import annotations

import json
import sys

import torch

sys.path.insert(0, sys.argv[1])  # the ComfyUI checkout
sys.argv = sys.argv[:1]  # ComfyUI parses the command line on import
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # no CUDA probing when ComfyUI is imported as a library
import comfy.ops  # noqa: E402
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

import fpq_plugin as fpq  # noqa: E402
from fpq_plugin.method import MethodConfig, quantize_with_method, recipe_for  # noqa: E402
from fpq_plugin.method.capture import UNetCall  # noqa: E402
from fpq_plugin.method.units import find_units  # noqa: E402

CONFIG = dict(image_size=8, use_spatial_transformer=True, legacy=False, in_channels=4, out_channels=4,
              model_channels=32, context_dim=32, use_linear_in_transformer=False, num_res_blocks=[1, 1],
              channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
              transformer_depth_middle=1, num_heads=4, num_head_channels=-1)

torch.manual_seed(0)
unet = UNetModel(**CONFIG, device="cpu", operations=comfy.ops.disable_weight_init)
for m in unet.modules():  # comfy ops skip initialisation; use torch's own
    for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
        if isinstance(m, base):
            base.reset_parameters(m)
unet.eval()
names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
units = find_units(unet, names)
calls = [UNetCall((torch.randn(2, 4, 8, 8), torch.tensor([900 - 300 * i] * 2), torch.randn(2, 6, 32)), {}, i)
         for i in range(3)]
with torch.no_grad():
    reference = unet(*calls[0].args)
quick = MethodConfig("quick", rounding_iters=20, search_rows=128, weight_shrink_factors=(1.0, 0.8))
report = quantize_with_method(unet, recipe_for("w4a8", quick), calls, method=quick)
with torch.no_grad():
    out = unet(*calls[0].args)
print(json.dumps({
    "block_types": sorted({type(unet.get_submodule(u.name)).__name__ for u in units if u.is_block}),
    "blocks": sum(u.is_block for u in units), "units": len(units), "layers": len(names),
    "quantized": len(fpq.quantized_layers(unet)), "kept": sorted({u.get("kept") for u in report.units}),
    "finite": bool(torch.isfinite(out).all()),
    "sqnr_db": float(10 * torch.log10(reference.pow(2).mean() / (reference - out).pow(2).mean())),
}))
