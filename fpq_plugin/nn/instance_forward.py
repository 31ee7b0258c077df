"""Give one module instance a replacement forward, and take it back (the fused-kernel patches use this).

An instance attribute ``forward`` shadows the class's method for that module only; ``copy.deepcopy`` rebinds it to
the copy, and ``state_dict`` is unaffected. A flag attribute records which patch is installed.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["has_forward", "install_forward", "norm_call_is_plain", "remove_forward"]


def install_forward(module: nn.Module, flag: str, forward: Callable) -> None:
    """Bind ``forward(module, ...)`` as ``module.forward`` unless the patch named ``flag`` is already there."""
    if not getattr(module, flag, False):
        module.forward = types.MethodType(forward, module)
        setattr(module, flag, True)


def remove_forward(module: nn.Module, flag: str) -> None:
    """Undo :func:`install_forward` (a no-op when that patch is not installed)."""
    if getattr(module, flag, False):
        del module.forward
        delattr(module, flag)


def has_forward(module: nn.Module, flag: str) -> bool:
    return bool(getattr(module, flag, False))


def _plain_attr(module: nn.Module, name: str):
    """``getattr(module, name, None)`` for a plain attribute (instance, then class), without nn.Module's Python
    ``__getattr__`` fallback, which a missing name goes through at ~1 us each (three per norm call on the host)."""
    d = module.__dict__
    return d[name] if name in d else getattr(type(module), name, None)


def norm_call_is_plain(module: nn.Module, x, args: tuple, kwargs: dict) -> bool:
    """Whether a norm's call is the plain inference call a fused kernel may replace: one tensor argument, no
    ``torch.compile`` tracing (Inductor fuses the norm itself), no autograd, and not a ComfyUI norm that casts offloaded
    weights or applies weight patches in its own forward."""
    return (
        not args
        and not kwargs
        and isinstance(x, torch.Tensor)
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())))
        and not _plain_attr(module, "comfy_cast_weights")
        and not _plain_attr(module, "weight_function")
        and not _plain_attr(module, "bias_function")
    )
