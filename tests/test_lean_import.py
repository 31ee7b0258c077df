"""`import fpq_plugin` stays cheap: no diffusers, transformers, triton or ComfyUI, and no CUDA initialisation."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lean() -> None:
    code = (
        "import sys, torch, fpq_plugin\n"
        "heavy = [m for m in ('diffusers', 'transformers', 'triton', 'comfy', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
