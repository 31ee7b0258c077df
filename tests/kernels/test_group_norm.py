"""fpq_plugin.kernels.group_norm: the split-reduction GroupNorm against ``F.group_norm``.

Bound: both compute ``x * a + b`` in fp32 and round once; ``a`` and ``b`` come from statistics summed in different
orders (fp32, relative differences ~1e-6, then both rounded to the input dtype as PyTorch stores them), so outputs
agree to one rounding of the output dtype plus 1e-4 of the
largest output (in the interpreter, which rounds fp32 -> bf16 toward zero, two roundings plus an ulp of the largest). CPU with
``TRITON_INTERPRET=1``: indexing (rows, chunks, ragged tails, the channel of each element); GPU (``-m gpu``; CI has
none, so they skip with that reason): the same bound on SD-sized shapes, and most elements identical.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ULP, interp
from helpers import TRITON_INTERPRET as INTERP
from helpers import needs_cuda_triton as needs_cuda

from fpq_plugin.kernels.group_norm import group_norm, group_norm_reference, group_norm_supported



def _case(shape, groups, dtype, device, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    if not affine:
        return x, None, None
    w = torch.randn(shape[1], generator=g).to(device=device, dtype=dtype)
    b = torch.randn(shape[1], generator=g).to(device=device, dtype=dtype)
    return x, w, b


def _cuda_semantics_reference(x, groups, w, b, eps):
    """F.group_norm as PyTorch's CUDA kernel computes it for a model in x's dtype: fp64 statistics rounded to x's
    dtype (what it stores them as), then x * a + b in fp32, rounded once. (PyTorch's CPU kernel keeps the statistics
    in fp32, so it is not the reference the interpreter is held to.)"""
    n, c = x.shape[:2]
    rows = x.double().reshape(n, groups, -1)
    mean = rows.mean(-1, keepdim=True).to(x.dtype).float()
    rstd = torch.rsqrt(rows.var(-1, unbiased=False, keepdim=True) + eps).to(x.dtype).float()
    shape = (1, groups, c // groups, -1)
    wf = (w.float() if w is not None else torch.ones(c)).reshape(shape)
    bf = (b.float() if b is not None else torch.zeros(c)).reshape(shape)
    a = rstd.unsqueeze(-1) * wf
    y = x.float().reshape(n, groups, c // groups, -1) * a + (bf - mean.unsqueeze(-1) * a)
    return y.reshape(x.shape).to(x.dtype)


def _check(shape, groups, dtype, device, affine, rounding_steps, floor=1e-4):
    x, w, b = _case(shape, groups, dtype, device, affine)
    reference = group_norm_reference if device == "cuda" else _cuda_semantics_reference
    y, ref = group_norm(x, groups, w, b, 1e-5), reference(x, groups, w, b, 1e-5)
    assert y.shape == ref.shape and y.dtype == dtype and y.is_contiguous()
    err = (y.float() - ref.float()).abs()
    bound = rounding_steps * ULP[dtype] * ref.float().abs() + floor * ref.float().abs().max()
    assert bool((err <= bound).all()), float((err - bound).max())
    return y, ref


def test_unsupported_inputs_are_reported():
    x = torch.ones(2, 8, 4, 4, dtype=torch.bfloat16)
    assert not group_norm_supported(x, 4)  # CPU
    assert not group_norm_supported(x.float(), 4)
    if not INTERP:
        with pytest.raises(RuntimeError, match="CUDA"):
            group_norm(x, 4)


@interp
def test_channels_that_do_not_divide_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        group_norm(torch.ones(1, 6, 4, dtype=torch.bfloat16), 4)


# rows shorter than a chunk; a row of several chunks with a ragged tail (40 * 230 = 9200 = 2 * 4096 + 1008); 3-d
SMALL = [((2, 64, 9, 11), 32), ((1, 40, 23, 10), 1), ((3, 8, 50), 4)]


@interp
@pytest.mark.parametrize("shape,groups", SMALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
def test_kernel_logic_in_the_interpreter(shape, groups, dtype, affine):
    # the interpreter truncates fp32 -> bf16, the statistics' rounding included: a row's mean can sit one bf16 ulp
    # off, which shifts the row's outputs by up to an ulp of the largest (an indexing bug errs by O(1))
    _check(shape, groups, dtype, "cpu", affine, rounding_steps=2, floor=ULP[dtype])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape,groups", SMALL + [((2, 320, 128, 128), 32), ((2, 1280, 8, 8), 32),
                                                  ((2, 960, 64, 64), 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_agrees_with_pytorch_on_the_gpu(shape, groups, dtype):
    y, ref = _check(shape, groups, dtype, "cuda", True, rounding_steps=1)
    assert (y != ref).float().mean().item() < 0.05
