"""Differences between the diffusers releases fpq supports (``diffusers>=0.30``), in one place."""

from __future__ import annotations

import functools

import torch

__all__ = ["dtype_kwargs"]


@functools.cache
def _takes_dtype() -> bool:
    # diffusers renamed ``from_pretrained(torch_dtype=...)`` to ``dtype=`` (0.42.1 warns on the old name; older
    # releases read only ``torch_dtype``). The helper that resolves the two names came with the rename, so its
    # presence tells which one this install reads.
    import diffusers.utils

    return hasattr(diffusers.utils, "_resolve_dtype")


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The keyword argument that sets the load dtype in this diffusers' ``from_pretrained``: ``{"dtype": ...}`` or
    ``{"torch_dtype": ...}``."""
    return {"dtype": dtype} if _takes_dtype() else {"torch_dtype": dtype}
