"""Content digests of tensor dicts: checkpoint integrity and model fingerprints share one definition."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over every tensor's name, dtype, shape and bytes, in sorted name order.

    Independent of device, of storage layout on disk and of the order tensors were written.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            flat = t.cpu().contiguous().reshape(-1).view(torch.uint8)
            h.update(memoryview(flat.numpy()))
    return h.hexdigest()
