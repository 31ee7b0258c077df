"""The comfy_quant exporter (nodes/comfy_quant.py) on small real models, without ComfyUI.

The exporter only needs torch and fpq_plugin, so it is loaded from its file (importing the ``nodes`` package would
import ComfyUI). That plain ComfyUI loads the exported file is checked by test_comfyui_server.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fpq_plugin import quantize_
from fpq_plugin.recipes import get_recipe

_SPEC = importlib.util.spec_from_file_location(
    "fpq_nodes_comfy_quant", Path(__file__).resolve().parents[2] / "nodes" / "comfy_quant.py"
)
comfy_quant = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(comfy_quant)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.proj = nn.Linear(64, 48)
    model.conv = nn.Conv2d(4, 8, 3, padding=1)
    model.norm = nn.LayerNorm(48)
    return model


def dequantized(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).dequantized_weight(torch.float32)


def test_per_tensor_fp8_linear_is_copied_bit_for_bit() -> None:
    model = tiny_model()
    quantize_(model, get_recipe("w8a16").replace(weight_granularity="tensor"))
    tensors, layers, counts = comfy_quant.comfy_quant_state_dict(model, torch.float16)
    assert layers == {"proj": {"format": "float8_e4m3fn"}}
    assert counts == {"native_exact": 1, "native_requantized": 0, "input_scales": 0, "dequantized": 1}
    assert tensors["proj.weight"].dtype == torch.float8_e4m3fn and tensors["proj.weight"].shape == (48, 64)
    assert tensors["proj.weight_scale"].shape == () and tensors["proj.weight_scale"].dtype == torch.float32
    # ComfyUI's dequantization: weight.float() * weight_scale.
    native = tensors["proj.weight"].float() * tensors["proj.weight_scale"]
    assert torch.equal(native, dequantized(model, "proj"))
    assert json.loads(bytes(tensors["proj.comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}


def test_per_channel_fp8_is_requantized_per_tensor_closely() -> None:
    model = tiny_model()
    with torch.no_grad():  # channels of very different magnitude: what per-channel scales are for
        model.proj.weight.mul_(torch.logspace(-2, 0, 48).unsqueeze(1))
    quantize_(model, "w8a16")
    tensors, _, counts = comfy_quant.comfy_quant_state_dict(model, torch.float16)
    assert counts["native_requantized"] == 1 and counts["native_exact"] == 0
    fpq = dequantized(model, "proj")
    native = tensors["proj.weight"].float() * tensors["proj.weight_scale"]
    rel = (native - fpq).norm() / fpq.norm()
    assert 0 < rel < 0.05, f"relative error of the per-tensor requantization {rel:.4f}"


def test_other_layers_are_stored_as_float_and_unquantized_tensors_kept() -> None:
    model = tiny_model()
    quantize_(model, "w4a16")  # FP4: ComfyUI's comfy_quant has no per-channel FP4 layout
    tensors, layers, counts = comfy_quant.comfy_quant_state_dict(model, torch.float16)
    assert layers == {} and counts["dequantized"] == 2
    assert tensors["proj.weight"].dtype == torch.float16 and tensors["proj.weight"].shape == (48, 64)
    assert tensors["conv.weight"].shape == (8, 4, 3, 3)
    assert torch.equal(tensors["proj.weight"], dequantized(model, "proj").to(torch.float16))
    assert torch.equal(tensors["norm.weight"], model.norm.weight.detach().half())
    assert not any(k.endswith(("weight_codes", "comfy_quant")) for k in tensors)


def test_activation_scale_is_exported_as_input_scale(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = tiny_model()
    quantize_(model, "w8a8", input_ranges={"proj": [-3.0, 3.0], "conv": [-2.0, 2.0]})
    path = tmp_path / "native.safetensors"
    counts = comfy_quant.save_comfy_quant(model, str(path), float_dtype=torch.bfloat16, provenance={"recipe": "w8a8"})
    assert counts["input_scales"] == 1
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        assert json.loads(meta["_quantization_metadata"]) == {
            "format_version": "1.0",
            "layers": {"proj": {"format": "float8_e4m3fn"}},
        }
        assert json.loads(meta["fpq_export"])["recipe"] == "w8a8"
        assert float(fh.get_tensor("proj.input_scale")) == pytest.approx(float(model.proj.input_scale))
        assert fh.get_tensor("conv.weight").dtype == torch.bfloat16
    assert not list(tmp_path.glob(".*.tmp")), "the write is atomic: no temp file left"
