"""Run a quantized model's transformer-block LayerNorms through fpq's one-pass kernel (:mod:`fpq_plugin.kernels.layer_norm`).

Which ones: the ``norm1`` / ``norm2`` / ``norm3`` of a transformer block (diffusers' ``BasicTransformerBlock`` and
ComfyUI's) whose consumer fpq quantized: ``attn1.to_q``, ``attn2.to_q`` and ``ff.net.0.proj`` read those norms'
outputs first. :func:`fpq_plugin.api.set_submodule` calls :func:`fuse_block_norm_for` whenever it installs a quantized
layer. The norm gets an instance forward; inputs the kernel does not cover (CPU, fp32, autograd,
``torch.compile`` tracing, a ComfyUI LayerNorm that casts offloaded weights or carries weight patches) run the
class's forward unchanged.

When the consumer will cast its input to FP8 with a static scale, the kernel also writes that cast and offers it
through the kernel backend's shared-cast memo (:func:`fpq_plugin.kernels.backend.offer_cast`), which checks address,
layout, version and scale before the Linear uses it. Only for tensors with a version counter (outside inference
mode): between a norm and its attention, ComfyUI runs optional patches that could write the tensor in place, which an
inference tensor would not reveal. Without the offer the consumer casts for itself, as before.

Measured on an H100 (W8A8 device time, :data:`ENABLED` and :data:`CAST_FOR_CONSUMER`): SDXL B2 33.47 -> 32.45 ms,
SDXL B1 21.59 -> 20.78 ms, SD1.5 B2 9.27 -> 9.13 ms; most of it from the kernel itself (PyTorch's LayerNorm was
~3.5x slower than its bytes need), the rest from the casts it writes. Its Python forward adds host time to eager
calls (SDXL B2, synchronised per call: 96 -> 103 ms); the front doors replay CUDA graphs, which do not see it.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fpq_plugin.nn.instance_forward import has_forward, install_forward, norm_call_is_plain, remove_forward

__all__ = ["fuse_block_norm_for", "is_fused_layer_norm", "unfuse_layer_norm"]

_FLAG = "_fpq_fused_layer_norm"
_LINK = "_fpq_norm_consumer"

# Module-wide switches (benchmarks compare both settings; tests check both paths; benchmarks/NOTES_GPU.md has what
# each measured).
ENABLED = True
CAST_FOR_CONSUMER = True

# (module, class name) of the transformer blocks whose norm1/norm2/norm3 feed attn1/attn2/ff in that order.
_KNOWN_BLOCKS = {
    ("diffusers.models.attention", "BasicTransformerBlock"),
    ("comfy.ldm.modules.attention", "BasicTransformerBlock"),
}
# consumer path inside the block (the first layer that reads the norm's output) -> the norm
_NORM_OF_CONSUMER = {
    ("attn1", "to_q"): "norm1",
    ("attn2", "to_q"): "norm2",
    ("ff", "net", "0", "proj"): "norm3",
}


def _is_known_block(module: nn.Module) -> bool:
    return any(c.__module__ == mod and c.__name__ == name for c in type(module).__mro__ for mod, name in _KNOWN_BLOCKS)


class _ConsumerLink:
    """A norm's weak reference to its block and the path of its consumer there (resolved at each call, so a layer
    replaced later is seen). deepcopy of the model links the copy to the copied block; pickled as unlinked."""

    __slots__ = ("ref", "path")

    def __init__(self, block: nn.Module | None, path: tuple[str, ...]):
        self.ref = weakref.ref(block) if block is not None else None
        self.path = path

    def consumer(self) -> nn.Module | None:
        m = self.ref() if self.ref is not None else None
        for name in self.path:
            if m is None:
                return None
            m = m._modules.get(name)
        return m

    def __deepcopy__(self, memo: dict) -> _ConsumerLink:
        block = self.ref() if self.ref is not None else None
        return _ConsumerLink(memo.get(id(block)) if block is not None else None, self.path)

    def __reduce__(self):
        return (_ConsumerLink, (None, self.path))


def _fused_forward(self, x, *args, **kwargs):
    from fpq_plugin.kernels.layer_norm import layer_norm, layer_norm_and_cast, layer_norm_supported

    if not (
        ENABLED
        and norm_call_is_plain(self, x, args, kwargs)
        and layer_norm_supported(x, self.normalized_shape)
        # parameters of another dtype or device (fp32 norms in a bf16 model) take PyTorch's mixed-type path
        and all(p is None or (p.device == x.device and p.dtype == x.dtype) for p in (self.weight, self.bias))
    ):
        return type(self).forward(self, x, *args, **kwargs)
    st = _consumer_cast(self, x) if CAST_FOR_CONSUMER else None
    if st is None:
        return layer_norm(x, self.weight, self.bias, self.eps)
    from fpq_plugin.kernels.backend import offer_cast

    out, q = layer_norm_and_cast(x, self.weight, self.bias, self.eps, st.xs, st.act_dtype)
    c = x.shape[-1]
    offer_cast(out.view(-1, c), st, q.view(-1, c))
    return out


def _consumer_cast(norm: nn.Module, x: torch.Tensor):
    """The kernel-backend state of the quantized layer that reads ``norm``'s output first, when it will cast that
    output to FP8 itself (so the kernel can write the cast instead), else None."""
    if torch.is_inference_mode_enabled():  # the output would have no version counter (see the module docstring)
        return None
    link = norm.__dict__.get(_LINK)
    consumer = link.consumer() if link is not None else None
    from fpq_plugin.nn.base import QuantizedLayer

    if not isinstance(consumer, QuantizedLayer):
        return None
    from fpq_plugin.kernels.backend import cast_ahead

    c = x.shape[-1]
    return cast_ahead(consumer, x.numel() // c, c)


def fuse_block_norm_for(model: nn.Module, consumer_name: str) -> bool:
    """If ``consumer_name`` (a dotted path in ``model``) is the first reader of a known transformer block's norm
    (``<block>.attn1.to_q`` -> ``<block>.norm1``, ``attn2.to_q`` -> ``norm2``, ``ff.net.0.proj`` -> ``norm3``) and
    that norm is an ``nn.LayerNorm``, give the norm the fused forward linked to that consumer; returns whether it
    did. Idempotent."""
    parts = tuple(consumer_name.split("."))
    for path, norm_name in _NORM_OF_CONSUMER.items():
        if len(parts) > len(path) and parts[-len(path):] == path:
            block = model.get_submodule(".".join(parts[: -len(path)]))
            norm = block._modules.get(norm_name)
            if not (_is_known_block(block) and isinstance(norm, nn.LayerNorm)):
                return False
            norm.__dict__[_LINK] = _ConsumerLink(block, path)
            install_forward(norm, _FLAG, _fused_forward)
            return True
    return False


def unfuse_layer_norm(module: nn.Module) -> None:
    """Undo the fused forward on ``module`` (a no-op when it has none)."""
    remove_forward(module, _FLAG)
    module.__dict__.pop(_LINK, None)


def is_fused_layer_norm(module: nn.Module) -> bool:
    return has_forward(module, _FLAG)
