"""Run the GEGLU of a quantized model's feed-forward blocks through fpq's one-pass kernel.

diffusers' ``GEGLU`` and ComfyUI's (``comfy.ldm.modules.attention.GEGLU``) both compute
``h, gate = self.proj(x).chunk(2, -1); return h * F.gelu(gate)``, which PyTorch runs as two generic strided kernels
(see :mod:`fpq_plugin.kernels.geglu`). When fpq swaps a quantized layer in as such a module's ``proj``,
:func:`fuse_geglu` gives that one module instance a forward that calls ``proj`` and then the fused kernel. Anything
the kernel does not cover (CPU tensors, fp32, ``torch.compile`` tracing, which fuses the two ops itself) runs the
class's own forward unchanged, so the patch never changes results beyond the kernel's stated agreement.

When the GEGLU starts a feed-forward ``[GEGLU, Dropout, Linear]`` run in order (``FeedForward.net``: diffusers'
is a ``ModuleList`` its ``forward`` loops over, ComfyUI's a ``Sequential``) whose Linear is a quantized layer that
will cast its input to FP8 with a static scale, the kernel also writes that cast (:func:`fpq_plugin.kernels.geglu.geglu_and_cast`) and offers it to the Linear through
the kernel backend's shared-cast memo, which checks address, layout, version and scale before using it. The link
from a GEGLU to its container is made by :func:`link_feed_forward` (``api.set_submodule`` calls it). Measured on an
H100 (:data:`CAST_FOR_NEXT_LINEAR`): SDXL B2 W8A8 device time 33.47 -> 33.14 ms, SDXL B1 21.59 -> 21.36 ms.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fpq_plugin.nn.instance_forward import has_forward, install_forward, remove_forward

__all__ = ["fuse_geglu", "is_fused_geglu", "link_feed_forward", "unfuse_geglu"]

# (module, class name) of the GEGLU implementations whose forward is exactly proj -> chunk -> h * exact gelu(gate).
_KNOWN_GEGLU = {
    ("diffusers.models.activations", "GEGLU"),
    ("comfy.ldm.modules.attention", "GEGLU"),
}
_FLAG = "_fpq_fused_geglu"

# Module-wide switches (benchmarks compare both settings; tests check both paths; benchmarks/NOTES_GPU.md has what
# each measured).
ENABLED = True
CAST_FOR_NEXT_LINEAR = True

_LINK = "_fpq_feed_forward"


class _FeedForwardLink:
    """A GEGLU's weak reference to the feed-forward container it starts (a strong one would be a cycle, and an
    ``nn.Module`` attribute would register the parent as a child). A deepcopy of the model links the copied GEGLU to
    the copied container (deepcopy records the container's copy before copying its children); a copy of the GEGLU
    alone is not linked. Pickled as unlinked."""

    __slots__ = ("ref",)

    def __init__(self, seq: nn.Module | None):
        self.ref = weakref.ref(seq) if seq is not None else None

    def get(self) -> nn.Module | None:
        return self.ref() if self.ref is not None else None

    def __deepcopy__(self, memo: dict) -> _FeedForwardLink:
        seq = self.get()
        return _FeedForwardLink(memo.get(id(seq)) if seq is not None else None)

    def __reduce__(self):
        return (_FeedForwardLink, (None,))


def _is_known_geglu(module: nn.Module) -> bool:
    cls = type(module)
    return any(c.__module__ == mod and c.__name__ == name for c in cls.__mro__ for mod, name in _KNOWN_GEGLU)


def _fused_forward(self, hidden_states, *args, **kwargs):
    from fpq_plugin.kernels.geglu import geglu, geglu_and_cast, geglu_supported

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
    st = _next_linear_cast(self, y) if CAST_FOR_NEXT_LINEAR else None
    if st is None:
        return geglu(y)
    from fpq_plugin.kernels.backend import offer_cast

    out, q = geglu_and_cast(y, st.xs, st.act_dtype)
    f = out.shape[-1]
    offer_cast(out.view(-1, f), st, q.view(-1, f))
    return out


def _no_hooks(*modules: nn.Module) -> bool:
    """No forward hook that could see or write the GEGLU's output before the Linear casts it (an in-place write to
    an inference tensor, which has no version counter, would go unnoticed)."""
    from torch.nn.modules import module as module_mod

    if getattr(module_mod, "_global_forward_hooks", None) or getattr(module_mod, "_global_forward_pre_hooks", None):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _next_linear_cast(geglu: nn.Module, y: torch.Tensor):
    """The kernel-backend state of the quantized Linear two steps after ``geglu`` when that Linear will cast the
    GEGLU's output itself (so the kernel can write the cast instead), else None."""
    link = geglu.__dict__.get(_LINK)
    seq = link.get() if link is not None else None
    if seq is None or len(seq) < 3 or seq[0] is not geglu:
        return None
    drop, linear = seq[1], seq[2]
    if not (isinstance(drop, nn.Dropout) and (drop.p == 0 or not drop.training)):
        return None
    from fpq_plugin.nn.base import QuantizedLayer

    if not isinstance(linear, QuantizedLayer) or not _no_hooks(geglu, drop, linear):
        return None
    from fpq_plugin.kernels.backend import cast_ahead

    f = y.shape[-1] // 2
    return cast_ahead(linear, y.numel() // y.shape[-1] if f else 0, f)


def link_feed_forward(seq: nn.Module, geglu: nn.Module) -> bool:
    """Record that ``geglu`` is the first module of the feed-forward ``seq`` (a ``Sequential`` or ``ModuleList``
    ``[GEGLU, Dropout, Linear, ...]`` run in order), so
    its fused forward may write the Linear's input cast; returns whether it was linked."""
    if not (isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) >= 3 and seq[0] is geglu
            and _is_known_geglu(geglu)):
        return False
    geglu.__dict__[_LINK] = _FeedForwardLink(seq)
    return True


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
