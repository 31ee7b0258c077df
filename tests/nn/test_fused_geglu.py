"""fpq_plugin.nn.fused_geglu: which modules get the fused GEGLU forward, and that it changes nothing it must not.

The kernel itself is tested in tests/kernels/test_geglu.py; here the patch: installed by every quantized-model build
(through ``api.set_submodule``), idempotent, survives ``deepcopy`` bound to the copy, reversible, and on the CPU (no
kernel) exactly the class's own forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.activations import GEGLU
from torch import nn

from fpq_plugin.api import quantize_
from fpq_plugin.models.unet_configs import build_unet, example_unet_inputs
from fpq_plugin.nn import QuantizedLayer
from fpq_plugin.nn import fused_geglu as fg


def _geglus(model):
    return [m for m in model.modules() if isinstance(m, GEGLU)]


def test_quantizing_a_unet_fuses_every_geglu_whose_proj_is_quantized():
    unet = build_unet("tiny", seed=0)
    assert _geglus(unet) and not any(fg.is_fused_geglu(m) for m in _geglus(unet))
    quantize_(unet, "w8a16")
    geglus = _geglus(unet)
    assert all(isinstance(m.proj, QuantizedLayer) for m in geglus)
    assert all(fg.is_fused_geglu(m) for m in geglus)


def test_skipped_proj_layers_leave_their_geglu_alone():
    unet = build_unet("tiny", seed=0)
    quantize_(unet, "w8a16", skip=("*ff.net.0.proj",))
    assert not any(fg.is_fused_geglu(m) for m in _geglus(unet))


def test_on_the_cpu_the_fused_forward_is_the_class_forward():
    torch.manual_seed(0)
    unet = build_unet("tiny", seed=0)
    quantize_(unet, "w8a16")
    inputs = example_unet_inputs(unet, batch=2, height=16, width=16)
    with torch.no_grad():
        fused = unet(**inputs).sample
        for m in _geglus(unet):
            fg.unfuse_geglu(m)
        plain = unet(**inputs).sample
    assert not any(fg.is_fused_geglu(m) for m in _geglus(unet))
    assert torch.equal(fused, plain)


def test_fusing_is_idempotent_and_only_for_known_classes():
    g = GEGLU(8, 16)
    assert fg.fuse_geglu(g) and fg.fuse_geglu(g)
    assert fg.is_fused_geglu(g)

    class OtherGEGLU(nn.Module):  # same name, another library: its forward might differ
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 32)

    OtherGEGLU.__name__ = "GEGLU"
    assert not fg.fuse_geglu(OtherGEGLU())


def test_deepcopy_binds_the_fused_forward_to_the_copy():
    g = GEGLU(8, 16)
    fg.fuse_geglu(g)
    c = copy.deepcopy(g)
    assert fg.is_fused_geglu(c)
    assert c.forward.__self__ is c
    seen = []
    c.proj.register_forward_hook(lambda mod, a, out: seen.append(mod))
    c(torch.randn(2, 8))
    assert seen == [c.proj]


def _gradients_flow(device, dtype):
    g = GEGLU(8, 16).to(device, dtype)
    fg.fuse_geglu(g)
    x = torch.randn(3, 8, device=device, dtype=dtype, requires_grad=True)
    g(x).float().sum().backward()
    return x.grad is not None and g.proj.weight.grad is not None


def test_training_takes_the_class_path_so_gradients_flow():
    assert _gradients_flow("cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")
def test_training_on_the_gpu_takes_the_class_path_so_gradients_flow():
    pytest.importorskip("triton")
    assert _gradients_flow("cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")
def test_a_quantized_unet_on_the_gpu_gives_the_same_output_fused_or_not(monkeypatch):
    pytest.importorskip("triton")
    unet = build_unet("tiny", seed=0).to("cuda", torch.bfloat16)
    quantize_(unet, "w8a16")
    inputs = example_unet_inputs(unet, batch=2, height=16, width=16)
    inputs = {k: (v.to("cuda", torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else
                  v.to("cuda") if torch.is_tensor(v) else v) for k, v in inputs.items()}
    calls = []
    from fpq_plugin.kernels import geglu as kg

    real = kg.geglu
    monkeypatch.setattr(kg, "geglu", lambda y: calls.append(y.shape) or real(y))
    with torch.no_grad():
        fused = unet(**inputs).sample
        monkeypatch.setattr(fg, "ENABLED", False)
        plain = unet(**inputs).sample
    assert calls, "the fused kernel never ran"
    # the kernel's GELU can round to the neighbouring bf16 value (tests/kernels/test_geglu.py): far below the
    # quantization error, but not bit-identical
    assert (fused.float() - plain.float()).abs().max() <= 2**-6 * plain.float().abs().max()
