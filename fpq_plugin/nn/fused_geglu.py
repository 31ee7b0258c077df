"""Run the GEGLU of a quantized model's feed-forward blocks through fpq's one-pass kernel.

diffusers' ``GEGLU`` and ComfyUI's (``comfy.ldm.modules.attention.GEGLU``) both compute
``h, gate = self.proj(x).chunk(2, -1); return h * F.gelu(gate)``, which PyTorch runs as two generic strided kernels
(see :mod:`fpq_plugin.kernels.geglu`). When fpq swaps a quantized layer in as such a module's ``proj``,
:func:`fuse_geglu` gives that one module instance a forward that calls ``proj`` and then the fused kernel. Anything
the kernel does not cover (CPU tensors, fp32, ``torch.compile`` tracing, which fuses the two ops itself) runs the
class's own forward unchanged, so the patch never changes results beyond the kernel's stated agreement.
"""

from __future__ import annotations

import torch
from torch import nn

from fpq_plugin.nn.instance_forward import has_forward, install_forward, remove_forward

__all__ = ["fuse_geglu", "is_fused_geglu", "unfuse_geglu"]

# (module, class name) of the GEGLU implementations whose forward is exactly proj -> chunk -> h * exact gelu(gate).
_KNOWN_GEGLU = {
    ("diffusers.models.activations", "GEGLU"),
    ("comfy.ldm.modules.attention", "GEGLU"),
}
_FLAG = "_fpq_fused_geglu"

# Module-wide switch (benchmarks compare with it off; tests check both paths).
ENABLED = True


def _is_known_geglu(module: nn.Module) -> bool:
    cls = type(module)
    return any(c.__module__ == mod and c.__name__ == name for c in cls.__mro__ for mod, name in _KNOWN_GEGLU)


def _fused_forward(self, hidden_states, *args, **kwargs):
    from fpq_plugin.kernels.geglu import geglu, geglu_supported

    if not (
        ENABLED
        and not args
        and not kwargs
        and isinstance(hidden_states, torch.Tensor)
        and not torch.compiler.is_compiling()
        and geglu_supported(hidden_states)
    ):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    y = self.proj(hidden_states)
    if y.requires_grad or not geglu_supported(y) or y.shape[-1] % 2:
        # the kernel has no backward (and a proj may change dtype): the classes' own arithmetic on proj's output
        h, gate = y.chunk(2, dim=-1)
        return h * torch.nn.functional.gelu(gate)
    return geglu(y)


def fuse_geglu(module: nn.Module) -> bool:
    """Give ``module`` (if it is a known GEGLU) the fused forward; returns whether it now has it. Idempotent."""
    if not _is_known_geglu(module):
        return False
    install_forward(module, _FLAG, _fused_forward)
    return True


def unfuse_geglu(module: nn.Module) -> None:
    """Undo :func:`fuse_geglu` on ``module`` (a no-op when it was not fused)."""
    remove_forward(module, _FLAG)


def is_fused_geglu(module: nn.Module) -> bool:
    return has_forward(module, _FLAG)
