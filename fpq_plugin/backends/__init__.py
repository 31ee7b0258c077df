"""Backends: who computes a quantized layer's forward.

A backend is an object with ``name``, ``supports(layer, x) -> str | None`` (``None`` when it can run, else the
reason it cannot) and ``linear(layer, x)`` / ``conv2d(layer, x)``. Layers hold a backend *name* in
``layer.backend``: ``"auto"`` picks the first backend of :data:`AUTO_ORDER` that supports the call, logging once
why faster ones were passed over; an explicit name runs that backend or raises with its reason.

Fast GPU kernels register themselves here (see :mod:`fpq_plugin.kernels`), so the layers never change.
"""

from __future__ import annotations

import logging

import torch

from fpq_plugin.backends.dequant import DequantBackend
from fpq_plugin.backends.reference import ReferenceBackend
from fpq_plugin.errors import LayerQuantizationError

logger = logging.getLogger(__name__)

BACKENDS: dict[str, object] = {}
AUTO_ORDER: list[str] = []
_warned: set[tuple[str, str]] = set()


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


def dispatch(layer, x: torch.Tensor) -> torch.Tensor:
    """Run ``layer`` on ``x`` with the backend it names."""
    if layer.backend == "auto":
        if x.is_cuda:
            _load_optional_backends()
        for name in AUTO_ORDER:
            backend = BACKENDS[name]
            reason = backend.supports(layer, x)
            if reason is None:
                return getattr(backend, layer.kind)(layer, x)
            if (name, reason) not in _warned:
                _warned.add((name, reason))
                logger.info("fpq: not using the %s backend: %s", name, reason)
        raise LayerQuantizationError(f"no backend can run {layer!r} on {x.device}")  # dequant always can
    backend = get_backend(layer.backend)
    reason = backend.supports(layer, x)
    if reason is not None:
        raise LayerQuantizationError(f"backend {layer.backend!r} cannot run this layer: {reason}")
    return getattr(backend, layer.kind)(layer, x)


__all__ = ["AUTO_ORDER", "BACKENDS", "dispatch", "get_backend", "register_backend"]
