"""fpq_plugin.nn.fused_geglu: which modules get the fused GEGLU forward, and that it changes nothing it must not.

The kernel itself is tested in tests/kernels/test_geglu.py; here the patch: installed by every quantized-model build
(through ``api.set_submodule``), idempotent, survives ``deepcopy`` bound to the copy, reversible, and on the CPU (no
kernel) exactly the class's own forward; and the link that lets the kernel write the next Linear's FP8 input cast.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import count_calls, inputs_to
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
    inputs = inputs_to(inputs, "cuda", torch.bfloat16)
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


def _w8a8_unet(device="cpu", dtype=torch.float32):
    unet = build_unet("tiny", seed=0)
    inputs = example_unet_inputs(unet, batch=2, height=16, width=16)
    with torch.no_grad():
        quantize_(unet, "w8a8", calibration_fn=lambda m: m(**inputs))
    return unet.to(device, dtype), inputs


def _feed_forwards(unet):
    return [m for m in unet.modules() if isinstance(m, nn.ModuleList) and m and isinstance(m[0], GEGLU)]


def test_quantizing_links_each_geglu_to_its_feed_forward():
    unet, _ = _w8a8_unet()
    nets = _feed_forwards(unet)
    assert nets and all(fg.is_fused_geglu(net[0]) for net in nets)
    assert all(net[0].__dict__[fg._LINK].get() is net for net in nets)
    assert not fg.link_feed_forward(nets[0][2], nets[0][0])  # not a container starting with that GEGLU
    seq = nn.Sequential(nets[0][0], nn.Dropout(0.0), nets[0][2])  # ComfyUI's FeedForward.net
    assert fg.link_feed_forward(seq, seq[0])


def test_the_next_linear_cast_is_asked_for_only_when_nothing_can_change_the_tensor_between():
    unet, _ = _w8a8_unet()
    net = _feed_forwards(unet)[0]
    geglu, drop, linear = net[0], net[1], net[2]
    y = torch.randn(2, 64, 2 * linear.in_features)
    assert fg._next_linear_cast(geglu, y) is None, "on the CPU no layer has resolved to the fp8 backend"
    linear.backend = "fp8"
    assert fg._next_linear_cast(geglu, y) is not None
    handle = drop.register_forward_hook(lambda *a: None)
    assert fg._next_linear_cast(geglu, y) is None
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    assert fg._next_linear_cast(geglu, y) is None
    handle.remove()
    drop.p, drop.training = 0.1, True
    assert fg._next_linear_cast(geglu, y) is None
    drop.training = False
    assert fg._next_linear_cast(geglu, y) is not None
    net[2] = nn.Linear(linear.in_features, linear.out_features)  # a float Linear casts nothing
    assert fg._next_linear_cast(geglu, y) is None


def test_deepcopy_links_the_copied_geglu_to_the_copied_feed_forward():
    unet, _ = _w8a8_unet()
    clone = copy.deepcopy(unet)
    for net in _feed_forwards(clone):
        assert net[0].__dict__[fg._LINK].get() is net
    alone = copy.deepcopy(_feed_forwards(unet)[0][0])
    assert alone.__dict__[fg._LINK].get() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")
@pytest.mark.parametrize("inference_mode", [False, True])
def test_the_geglu_writes_the_next_linears_cast_with_identical_results(monkeypatch, inference_mode):
    """W8A8 on the GPU: the feed-forward's Linear uses the cast the GEGLU kernel wrote (its own cast kernel runs
    fewer times) and the UNet output is bit-identical to the unfused-cast path, in and outside inference mode."""
    pytest.importorskip("triton")
    from fpq_plugin.kernels import backend as kb
    from fpq_plugin.kernels import geglu as kg

    unet, inputs = _w8a8_unet()
    unet = unet.to("cuda", torch.bfloat16)
    inputs = inputs_to(inputs, "cuda", torch.bfloat16)
    monkeypatch.setattr(fg, "CAST_FOR_NEXT_LINEAR", True)  # the default; set so the test checks this path whatever it is
    casts, fused = count_calls(monkeypatch, kb, "_cast_once"), count_calls(monkeypatch, kg, "geglu_and_cast")
    grad_mode = torch.inference_mode() if inference_mode else torch.no_grad()
    with grad_mode:
        unet(**inputs)  # first call: each layer resolves its backend
        casts.clear(), fused.clear()
        with_cast = unet(**inputs).sample
        n_casts, n_fused = len(casts), len(fused)
        monkeypatch.setattr(fg, "CAST_FOR_NEXT_LINEAR", False)
        casts.clear()
        without = unet(**inputs).sample
    assert n_fused == len(_feed_forwards(unet)), "the GEGLU kernel did not write the cast"
    assert len(casts) - n_casts == n_fused, "the Linear cast its input again"
    assert torch.equal(with_cast, without)
