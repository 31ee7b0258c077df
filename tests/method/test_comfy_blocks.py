"""Block reconstruction finds ComfyUI's own UNet block classes (ResBlock, BasicTransformerBlock) and quantizes a
ComfyUI UNetModel end to end. Needs a ComfyUI checkout (COMFYUI_PATH) and its Python (FPQ_COMFY_PYTHON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("FPQ_COMFY_PYTHON", sys.executable)

pytestmark = [
    pytest.mark.comfy,
    pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout (and FPQ_COMFY_PYTHON) to run"),
]


def test_method_on_a_comfyui_unet() -> None:
    script = Path(__file__).with_name("comfy_blocks_check.py")
    result = subprocess.run([PYTHON, str(script), COMFY], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["block_types"] == ["BasicTransformerBlock", "ResBlock"]
    assert info["quantized"] == info["layers"] and info["finite"]
    assert info["sqnr_db"] > 5
