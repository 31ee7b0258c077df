"""Typed exceptions raised by fpq.

Every error a user can cause derives from :class:`FPQError`, so front doors (CLI, ComfyUI nodes, diffusers hook)
can catch one type and show its message. Each subclass also derives from the builtin exception a Python user
would expect (``ValueError`` for bad values, ``OSError`` for files), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class FPQError(Exception):
    """Base class of every error fpq raises on purpose."""


class FormatError(FPQError, ValueError):
    """An unknown number-format name, or a value a format cannot encode."""


class RecipeError(FPQError, ValueError):
    """A recipe (quantization configuration) is malformed; the message names the field and the fix."""


class LayerQuantizationError(FPQError, ValueError):
    """A layer cannot be quantized as asked (unsupported shape, padding mode, missing activation scale...)."""


class CheckpointError(FPQError, OSError):
    """A quantized checkpoint is truncated, tampered with, of an unknown version, or does not fit the model."""


class CancelledError(FPQError):
    """Long work (calibration, learned rounding) was cancelled by the caller between two steps."""
