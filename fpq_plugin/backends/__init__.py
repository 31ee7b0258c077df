"""Backends: who computes a quantized layer's forward.

A backend is an object with ``name``, ``supports(layer, x) -> str | None`` (``None`` when it can run, else the
reason it cannot) and ``linear(layer, x)`` / ``conv2d(layer, x)``. Layers hold a backend *name* in
``layer.backend``: ``"auto"`` picks the first backend of :data:`AUTO_ORDER` that supports the call, logging once
why faster ones were passed over; an explicit name runs that backend or raises with its reason.

Fast GPU kernels register themselves here (see :mod:`fpq_plugin.kernels`), so the layers never change.
"""

from __future__ import annotations

import logging
import warnings
import weakref

import torch

from fpq_plugin.backends.dequant import DequantBackend
from fpq_plugin.backends.reference import ReferenceBackend
from fpq_plugin.errors import LayerQuantizationError

logger = logging.getLogger(__name__)

BACKENDS: dict[str, object] = {}
AUTO_ORDER: list[str] = []
_warned: set[tuple[str, str]] = set()
# layer -> ((device, dtype, len(AUTO_ORDER)), bound method): outside the module, so pickling/deepcopy never see it
_AUTO_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_backend(backend: object, *, auto_priority: int | None = None) -> None:
    """Add a backend; ``auto_priority`` inserts it into :data:`AUTO_ORDER` (0 = tried first)."""
    BACKENDS[backend.name] = backend
    if auto_priority is not None and backend.name not in AUTO_ORDER:
        AUTO_ORDER.insert(auto_priority, backend.name)


register_backend(ReferenceBackend())
register_backend(DequantBackend(), auto_priority=0)


def get_backend(name: str):
    try:
        return BACKENDS[name]
    except KeyError:
        raise LayerQuantizationError(
            f"unknown backend {name!r}; registered backends: {', '.join(BACKENDS)} (or 'auto')"
        ) from None


def _load_optional_backends() -> None:
    # Imported on first use so that `import fpq_plugin` never imports triton or initialises CUDA.
    if getattr(_load_optional_backends, "done", False):
        return
    _load_optional_backends.done = True
    try:
        from fpq_plugin.kernels import register_kernel_backends
    except ImportError:
        return
    register_kernel_backends()


def _auto_pick(layer, x: torch.Tensor):
    """The first backend of :data:`AUTO_ORDER` that supports this call, with the one-time fallback messages."""
    compiling = torch.compiler.is_compiling()
    for name in AUTO_ORDER:
        backend = BACKENDS[name]
        reason = backend.supports(layer, x)
        if reason is None:
            return backend
        if compiling or (name, reason) in _warned:  # (Dynamo cannot trace logging: messages are the eager call's)
            continue
        _warned.add((name, reason))
        # A missing capability of this machine (old GPU, no triton) deserves a warning the user sees once; a layer
        # the backend does not cover (weight-only layer on the fp8 backend) is by design and only logged.
        available = getattr(backend, "available", None)
        if x.is_cuda and available is not None and available(x) is not None:
            warnings.warn(
                f"fpq: backend 'auto' is not using the {name!r} backend on this machine: {reason}; "
                "falling back to a slower path",
                RuntimeWarning,
                stacklevel=4,
            )
        else:
            logger.info("fpq: not using the %s backend: %s", name, reason)
    raise LayerQuantizationError(f"no backend can run {layer!r} on {x.device}")  # dequant always can


_announced: set[tuple[str, str, str]] = set()


def _log_first_use(name: str, kind: str, x: torch.Tensor) -> None:
    """One log line the first time 'auto' runs a layer kind on a backend and device: which path really computes
    (e.g. "linear on 'fp8' (cuda:0)" is the FP8 tensor-core path), for logs such as ComfyUI's."""
    key = (name, kind, str(x.device))
    if key not in _announced:
        _announced.add(key)
        logger.info("fpq: backend 'auto' runs quantized %s layers on %r (%s, %s input)", kind, name, x.device,
                    str(x.dtype).removeprefix("torch."))


def dispatch(layer, x: torch.Tensor) -> torch.Tensor:
    """Run ``layer`` on ``x`` with the backend it names."""
    if layer.backend == "auto":
        if torch.compiler.is_compiling():
            # the eager pick, kept as a plain string on the layer: Dynamo reads it as a constant, where the
            # capability checks and the weak cache below would break the graph
            name = getattr(layer, "_fpq_auto_backend", None)
            backend = BACKENDS[name] if name in BACKENDS else _auto_pick(layer, x)
            return getattr(backend, layer.kind)(layer, x)
        # The choice depends only on the layer (fixed formats) and the input's device and dtype: remember it per
        # layer, so an eager call pays one dict lookup instead of every backend's checks (~1000 calls per UNet step).
        key = (x.device, x.dtype, len(AUTO_ORDER))
        hit = _AUTO_CACHE.get(layer)
        if hit is not None and hit[0] == key:
            return hit[1](layer, x)
        if x.is_cuda:
            _load_optional_backends()
            key = (x.device, x.dtype, len(AUTO_ORDER))
        backend = _auto_pick(layer, x)
        _log_first_use(backend.name, layer.kind, x)
        fn = getattr(backend, layer.kind)
        _AUTO_CACHE[layer] = (key, fn)
        if x.is_cuda:  # for torch.compile of this (GPU) model later
            layer._fpq_auto_backend = backend.name
        return fn(layer, x)
    backend = get_backend(layer.backend)
    reason = backend.supports(layer, x)
    if reason is not None:
        raise LayerQuantizationError(f"backend {layer.backend!r} cannot run this layer: {reason}")
    return getattr(backend, layer.kind)(layer, x)


__all__ = ["AUTO_ORDER", "BACKENDS", "dispatch", "get_backend", "register_backend"]
