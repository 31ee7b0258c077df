"""Differences between the diffusers releases fpq supports (``diffusers>=0.30``), in one place."""

from __future__ import annotations

import functools

import torch

__all__ = ["dtype_kwargs"]


@functools.cache
def _takes_dtype() -> bool:
    # diffusers renamed ``from_pretrained(torch_dtype=...)`` to ``dtype=`` (0.40 and later warn on the old name;
    # 0.30-0.37, checked, read only ``torch_dtype``). The helper that resolves the two names came with the rename
    # (in 0.40, not in 0.37), so its presence tells which one this install reads.
    import diffusers.utils

    return hasattr(diffusers.utils, "_resolve_dtype")


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The keyword argument that sets the load dtype in this diffusers' ``from_pretrained``: ``{"dtype": ...}`` or
    ``{"torch_dtype": ...}``."""
    return {"dtype": dtype} if _takes_dtype() else {"torch_dtype": dtype}
