"""Shared test helpers: seeded tensors, error metrics, and the skip marks of the kernel tests."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_TRITON = importlib.util.find_spec("triton") is not None
# bf16/fp16 unit roundoff steps (one ulp relative to the value)
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}

interp = pytest.mark.skipif(not (TRITON_INTERPRET and HAS_TRITON),
                            reason="set TRITON_INTERPRET=1 (and install triton) to run the kernel logic on the CPU")
needs_cuda_triton = pytest.mark.skipif(TRITON_INTERPRET or not (torch.cuda.is_available() and HAS_TRITON),
                                       reason="needs a CUDA GPU and triton; CI has none")


def randn(*shape: int, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is closer)."""
    reference, approx = reference.detach().double(), approx.detach().double()
    noise = (reference - approx).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise.clamp_min(1e-30)))


def inputs_to(inputs: dict, device, dtype: torch.dtype) -> dict:
    """UNet call arguments moved to ``device``; floating-point tensors also cast to ``dtype``."""
    return {k: (v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else
                v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that each call appends to the returned list, then runs the real function."""
    real = getattr(module, name)
    calls: list = []
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls
