"""Run inside ComfyUI's Python (see test_comfy_lowvram.py): an fpq MODEL under ComfyUI's partial (lowvram) loading.

ComfyUI's ``ModelPatcher.load(..., lowvram_model_memory=N)`` keeps the modules that do not fit in ``N`` bytes
offloaded, flags them ``comfy_cast_weights`` and hands them their LoRA as a per-forward ``weight_function``; the
modules that fit get the LoRA baked in (``patch_weight_to_device``). With a CUDA GPU the model loads onto it and
the offloaded layers stay in CPU memory (each forward runs them on a moved copy of their buffers, through fpq's GPU
backends). On a CPU-only machine the load and offload devices are the same, but the bookkeeping (which is what
fpq's layers must cooperate with) runs exactly as on a GPU. Prints one JSON line.

    python comfy_lowvram_check.py <ComfyUI checkout> <repo root> <work dir>
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import torch

COMFY, REPO, WORK = sys.argv[1:4]
sys.path.insert(0, COMFY)
sys.argv = sys.argv[:1]  # ComfyUI parses the command line on import
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = not torch.cuda.is_available()
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "tests", "nodes"))
import make_comfy_test_models as models  # noqa: E402

# Load the node pack the way ComfyUI does: the repository root as a package under a name of its own.
spec = importlib.util.spec_from_file_location("fpq_pack", os.path.join(REPO, "__init__.py"),
                                              submodule_search_locations=[REPO])
pack = importlib.util.module_from_spec(spec)
sys.modules["fpq_pack"] = pack
spec.loader.exec_module(pack)
from fpq_pack.nodes import comfy_integration as ci  # noqa: E402
from fpq_pack.nodes.quantize_node import FPQuantizeUNet, NodeProgress  # noqa: E402

from fpq_plugin.recipes import get_recipe  # noqa: E402

for sub in ("diffusion_models", "loras"):
    os.makedirs(os.path.join(WORK, sub), exist_ok=True)
unet_sd = models.make_unet(WORK)
models.make_lora(WORK, unet_sd)
del unet_sd
plain = comfy.sd.load_diffusion_model(os.path.join(WORK, "diffusion_models", "tiny_sd15_unet.safetensors"))

recipe = get_recipe("w4a16")
names = ci.quantizable_layers(plain, recipe)
quantize = FPQuantizeUNet._data_free_quantizer(recipe, NodeProgress(0, len(names)), plain.load_device,
                                                plain.offload_device)
quantized, _ = ci.quantized_copy(plain, recipe, names, quantize=quantize, cache=None)
lora = comfy.utils.load_torch_file(os.path.join(WORK, "loras", "tiny_lora.safetensors"), safe_load=True)
with_lora, _ = comfy.sd.load_lora_for_models(quantized, None, lora, 1.0, 0.0)

load_device, offload_device = quantized.load_device, quantized.offload_device
torch.manual_seed(0)
x, t, context = (v.to(load_device) for v in (torch.randn(2, 4, 8, 8), torch.tensor([700.0, 700.0]),
                                               torch.randn(2, 6, 768)))


def layers_of(patcher):
    return [m for m in patcher.model.diffusion_model.modules() if isinstance(m, ci.QuantizedLayer)]


def run(patcher, lowvram_bytes: int = 0) -> tuple[torch.Tensor, dict]:
    """One forward with the patcher loaded fully (0) or within ``lowvram_bytes``; unloaded afterwards."""
    patcher.patch_model(device_to=load_device, lowvram_model_memory=lowvram_bytes)
    try:
        layers = layers_of(patcher)
        state = {
            "offloaded": sum(bool(getattr(m, "comfy_cast_weights", False)) for m in layers),
            "per_forward_lora": sum(
                any(isinstance(f, comfy.model_patcher.LowVramPatch) for f in m.weight_function) for m in layers
            ),
            "lowvram": bool(patcher.model.model_lowvram),
            "on_load_device": sum(m.weight_codes.device == torch.device(load_device) for m in layers),
        }
        with torch.no_grad():
            out = patcher.model.apply_model(x, t, c_crossattn=context).float()
    finally:
        patcher.unpatch_model(device_to=offload_device)
    return out, state


def fused_kernels(on: bool) -> None:
    """fpq's GroupNorm / LayerNorm / GEGLU kernels (GPU only). A layer ComfyUI offloads casts its norm weights per
    forward, so its norms run PyTorch's kernels while a loaded model's run fpq's, which round a few percent of
    outputs to the neighbouring fp16 value: with them off, partial and full loading run the same arithmetic."""
    from fpq_plugin.nn import fused_geglu, fused_group_norm, fused_layer_norm

    fused_geglu.ENABLED = fused_group_norm.ENABLED = fused_layer_norm.ENABLED = on


codes_before = [m.weight_codes.clone() for m in layers_of(quantized)]
no_lora, _ = run(quantized)
full_fused, _ = run(with_lora)
partial_fused, _ = run(with_lora, lowvram_bytes=quantized.model_size() // 2)
fused_kernels(False)
full, full_state = run(with_lora)
partial, partial_state = run(with_lora, lowvram_bytes=quantized.model_size() // 2)
fused_kernels(True)
after, _ = run(quantized)
codes_after = [m.weight_codes for m in layers_of(quantized)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


print(json.dumps({
    "load_device": str(load_device),
    "offload_device": str(offload_device),
    "layers": len(names),
    "float_bytes": plain.model_size(),  # in the dtype ComfyUI loaded (fp16 on a GPU, fp32 on a CPU)
    "fp32_bytes": 4 * sum(t.numel() for t in plain.model.diffusion_model.state_dict().values()
                          if t.is_floating_point()),
    "quantized_bytes": quantized.model_size(),
    "full": full_state,
    "partial": partial_state,
    "lora_effect": rel(full, no_lora),
    "partial_vs_full": rel(partial, full),
    "partial_vs_full_fused_kernels": rel(partial_fused, full_fused),
    "unloaded_equals_before": rel(after, no_lora),
    "codes_restored": all(torch.equal(a, b) for a, b in zip(codes_before, codes_after)),
    "finite": bool(torch.isfinite(partial).all()),
}))
