"""An fpq MODEL under ComfyUI's partial (``--lowvram``) loading, with a LoRA on top: the layers ComfyUI leaves
offloaded take the LoRA per forward, the loaded ones have it baked in, and both give the fully loaded model's
output. Runs ComfyUI's own ModelPatcher in its Python (``comfy_lowvram_check.py``); needs COMFYUI_PATH and
FPQ_COMFY_PYTHON, and skips without them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("FPQ_COMFY_PYTHON", sys.executable)
REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.comfy,
    pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout (and FPQ_COMFY_PYTHON) to run"),
]


def test_partial_loading_with_a_lora_matches_the_full_load(tmp_path) -> None:
    script = Path(__file__).with_name("comfy_lowvram_check.py")
    result = subprocess.run([PYTHON, str(script), COMFY, str(REPO), str(tmp_path)], capture_output=True, text=True,
                            timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    # ComfyUI's size accounting sees the quantized buffers: 4-bit codes + scales, about 1/8 of the fp32 weights.
    assert info["quantized_bytes"] < 0.2 * info["fp32_bytes"]
    print(f"\nlowvram check on {info['load_device']} (offload {info['offload_device']}): {info}")
    assert info["full"] == {"offloaded": 0, "per_forward_lora": 0, "lowvram": False, "on_load_device": info["layers"]}
    partial = info["partial"]
    assert partial["lowvram"] and 0 < partial["offloaded"] < info["layers"] and partial["per_forward_lora"] > 0
    if info["load_device"] != info["offload_device"]:  # a GPU: what lowvram keeps offloaded stays in CPU memory
        assert partial["on_load_device"] == info["layers"] - partial["offloaded"]
    assert info["lora_effect"] > 0.05  # the LoRA changes the output visibly...
    assert info["partial_vs_full"] < 1e-4, info  # ...the same way whether its layers are offloaded or loaded
    # With fpq's norm/GEGLU kernels on (the default), offloaded layers' norms run PyTorch's kernels instead: one fp16
    # rounding apart in a few percent of elements (H100: 0.22% of the output), far below the quantization error.
    assert info["partial_vs_full_fused_kernels"] < 1e-2, info
    assert info["unloaded_equals_before"] == 0.0 and info["codes_restored"] and info["finite"]
