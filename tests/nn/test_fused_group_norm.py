"""fpq_plugin.nn.fused_group_norm: GroupNorms beside quantized layers get the fused forward, and nothing changes
where the kernel does not run (the kernel itself: tests/kernels/test_group_norm.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fpq_plugin.api import quantize_
from fpq_plugin.models.unet_configs import build_unet, example_unet_inputs
from fpq_plugin.nn import fused_group_norm as fgn


def _norms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}


def test_quantizing_a_unet_fuses_the_group_norms_beside_quantized_layers():
    unet = build_unet("tiny", seed=0)
    quantize_(unet, "w8a16")
    norms = _norms(unet)
    assert norms and all(fgn.is_fused_group_norm(m) for m in norms.values()), \
        [n for n, m in norms.items() if not fgn.is_fused_group_norm(m)]


def test_a_norm_with_no_quantized_neighbour_is_left_alone():
    unet = build_unet("tiny", seed=0)
    quantize_(unet, "w8a16", skip=("conv_out", "conv_in"))  # the UNet root's quantizable children
    assert not fgn.is_fused_group_norm(unet.conv_norm_out)
    assert fgn.is_fused_group_norm(unet.down_blocks[0].resnets[0].norm1)


def test_on_the_cpu_the_fused_forward_is_group_norm_itself():
    unet = build_unet("tiny", seed=0)
    quantize_(unet, "w8a16")
    inputs = example_unet_inputs(unet, batch=2, height=16, width=16)
    with torch.no_grad():
        fused = unet(**inputs).sample
        for m in _norms(unet).values():
            fgn.unfuse_group_norm(m)
        plain = unet(**inputs).sample
    assert not any(fgn.is_fused_group_norm(m) for m in _norms(unet).values())
    assert torch.equal(fused, plain)


def test_fusing_is_idempotent_and_survives_deepcopy():
    gn = nn.GroupNorm(4, 8)
    assert fgn.fuse_group_norm(gn) and fgn.fuse_group_norm(gn)
    assert not fgn.fuse_group_norm(nn.LayerNorm(8))
    c = copy.deepcopy(gn)
    assert fgn.is_fused_group_norm(c) and c.forward.__self__ is c
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(c(x), torch.nn.functional.group_norm(x, 4, c.weight, c.bias, c.eps))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")
def test_on_the_gpu_the_kernel_runs_and_training_keeps_autograd(monkeypatch):
    pytest.importorskip("triton")
    from fpq_plugin.kernels import group_norm as kgn

    gn = nn.GroupNorm(4, 64).to("cuda", torch.bfloat16)
    fgn.fuse_group_norm(gn)
    calls = []
    real = kgn.group_norm
    monkeypatch.setattr(kgn, "group_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 64, 16, 16, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = gn(x)
    assert calls == [1]
    ref = torch.nn.functional.group_norm(x, 4, gn.weight, gn.bias, gn.eps)
    assert (y.float() - ref.float()).abs().max() <= 2**-6 * ref.float().abs().max()
    xg = x.clone().requires_grad_(True)
    gn(xg).float().sum().backward()  # the class path: the kernel has no backward
    assert xg.grad is not None and calls == [1]
