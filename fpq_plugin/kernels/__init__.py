"""GPU kernels of fpq, and their pure-PyTorch references.

``fpq_plugin.kernels.fp8_linear``
    Quantized Linear: ``y = (fp8(x / x_scale) @ W^T) * (x_scale * w_scale) + bias`` with a *static* activation
    scale. The Triton kernel fuses the bf16/fp16 -> fp8 activation cast into the GEMM's A-tile load, decodes
    8-bit (float8_e4m3fn codes) or packed 4-bit weights (16-entry code table) on the fly, and applies the
    per-channel scale and bias in the epilogue. ``fp8_linear_reference`` defines the exact semantics on any
    device.

``fpq_plugin.kernels.qops``
    Memory-bound helpers that let cuBLAS/cuDNN run quantized layers: per-call weight decode (16/256-entry table,
    scales folded in) and the one-pass static-scale activation cast, with pure-PyTorch references.

``fpq_plugin.kernels.geglu``, ``fpq_plugin.kernels.group_norm``, ``fpq_plugin.kernels.layer_norm``
    One-pass GEGLU, a split-reduction GroupNorm and a one-pass LayerNorm for the float ops around quantized
    layers, where PyTorch's kernels run far from the memory bandwidth (installed by :mod:`fpq_plugin.nn.fused_geglu`,
    :mod:`fpq_plugin.nn.fused_group_norm` and :mod:`fpq_plugin.nn.fused_layer_norm`); the GEGLU and LayerNorm
    kernels can also write the FP8 input of the quantized Linear that reads their output.

``fpq_plugin.kernels.backend``
    The ``fp8`` (sm_89+, FP8 tensor cores for Linear) and ``decode`` (any CUDA GPU) backends, registered for
    ``backend='auto'`` by :func:`register_kernel_backends` (the dispatcher calls it on the first CUDA input).

Nothing here imports Triton at import time: ``import fpq_plugin`` stays cheap and works without Triton or a GPU.
Import the submodule when you need it (``from fpq_plugin.kernels import fp8_linear``); it, too, only imports
Triton on the first kernel call.
"""

from __future__ import annotations

import importlib.util

__all__ = ["register_kernel_backends", "triton_available"]


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def register_kernel_backends() -> None:
    """Register the GPU backends (``fp8``, ``decode``) for ``backend='auto'``; called by the dispatcher on the first
    CUDA input. Imports neither Triton nor CUDA."""
    from fpq_plugin.kernels.backend import register_kernel_backends as _register

    _register()
