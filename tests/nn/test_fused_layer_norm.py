"""fpq_plugin.nn.fused_layer_norm: which LayerNorms get the fused forward, their link to the layer they feed, and
that the patch changes nothing it must not (the kernel itself: tests/kernels/test_layer_norm.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import count_calls, inputs_to
from torch import nn

from fpq_plugin.api import quantize_
from fpq_plugin.models.unet_configs import build_unet, example_unet_inputs
from fpq_plugin.nn import fused_layer_norm as fln


def _w8a8_unet(**kw):
    unet = build_unet("tiny", seed=0)
    inputs = example_unet_inputs(unet, batch=2, height=16, width=16)
    with torch.no_grad():
        quantize_(unet, "w8a8", calibration_fn=lambda m: m(**inputs), **kw)
    return unet, inputs


def _blocks(unet):
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


def test_quantizing_fuses_each_block_norm_linked_to_the_layer_it_feeds():
    unet, _ = _w8a8_unet()
    blocks = _blocks(unet)
    assert blocks
    for blk in blocks:
        for norm, consumer in ((blk.norm1, blk.attn1.to_q), (blk.norm2, blk.attn2.to_q),
                               (blk.norm3, blk.ff.net[0].proj)):
            assert fln.is_fused_layer_norm(norm)
            assert norm.__dict__[fln._LINK].consumer() is consumer


def test_a_skipped_consumer_leaves_its_norm_alone():
    unet, _ = _w8a8_unet(skip=("*attn2.to_q",))
    for blk in _blocks(unet):
        assert not fln.is_fused_layer_norm(blk.norm2)
        assert fln.is_fused_layer_norm(blk.norm1) and fln.is_fused_layer_norm(blk.norm3)


def test_only_known_blocks_and_consumer_paths_are_fused():
    class Block(nn.Module):  # same attribute names, unknown class: its forward might feed norm1 elsewhere
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(8)
            self.attn1 = nn.Module()
            self.attn1.to_q = nn.Linear(8, 8)

    model = nn.Sequential(Block())
    assert not fln.fuse_block_norm_for(model, "0.attn1.to_q")
    assert not fln.is_fused_layer_norm(model[0].norm1)
    unet, _ = _w8a8_unet()
    assert not fln.fuse_block_norm_for(unet, "conv_in")


def test_on_the_cpu_the_fused_forward_is_the_class_forward():
    unet, inputs = _w8a8_unet()
    with torch.no_grad():
        fused = unet(**inputs).sample
        for m in unet.modules():
            if isinstance(m, nn.LayerNorm):
                fln.unfuse_layer_norm(m)
        plain = unet(**inputs).sample
    assert not any(fln.is_fused_layer_norm(m) for m in unet.modules())
    assert torch.equal(fused, plain)


def test_the_consumer_cast_is_asked_for_only_outside_inference_mode_and_for_quantized_consumers():
    unet, _ = _w8a8_unet()
    blk = _blocks(unet)[0]
    x = torch.randn(2, 64, blk.norm1.normalized_shape[0])
    assert fln._consumer_cast(blk.norm1, x) is None, "on the CPU no layer has resolved to the fp8 backend"
    blk.attn1.to_q.backend = "fp8"
    assert fln._consumer_cast(blk.norm1, x) is not None
    with torch.inference_mode():
        assert fln._consumer_cast(blk.norm1, x) is None
    blk.attn1.to_q = nn.Linear(x.shape[-1], x.shape[-1])  # replaced by a float layer: the link sees it
    assert fln._consumer_cast(blk.norm1, x) is None


def test_deepcopy_links_the_copied_norm_to_the_copied_consumer():
    unet, _ = _w8a8_unet()
    clone = copy.deepcopy(unet)
    for blk in _blocks(clone):
        assert blk.norm1.__dict__[fln._LINK].consumer() is blk.attn1.to_q
        assert blk.norm1.forward.__self__ is blk.norm1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")
def test_on_the_gpu_the_norm_writes_the_consumers_cast_with_agreeing_results(monkeypatch):
    """W8A8, bf16: the kernel runs on every block norm, the Linears reuse the casts it wrote (fewer cast kernels),
    and the UNet output agrees with the kernel without the cast and with PyTorch's LayerNorm within the kernel's
    rounding agreement (far below the quantization error)."""
    pytest.importorskip("triton")
    from fpq_plugin.kernels import backend as kb
    from fpq_plugin.kernels import layer_norm as kln

    unet, inputs = _w8a8_unet()
    unet = unet.to("cuda", torch.bfloat16)
    inputs = inputs_to(inputs, "cuda", torch.bfloat16)
    monkeypatch.setattr(fln, "ENABLED", True)  # the default; set so the test checks this path whatever it is
    monkeypatch.setattr(fln, "CAST_FOR_CONSUMER", True)
    casts, fused = count_calls(monkeypatch, kb, "_cast_once"), count_calls(monkeypatch, kln, "layer_norm_and_cast")
    with torch.no_grad():
        unet(**inputs)  # first call: each layer resolves its backend
        casts.clear(), fused.clear()
        with_cast = unet(**inputs).sample
        n_casts, n_fused = len(casts), len(fused)
        monkeypatch.setattr(fln, "CAST_FOR_CONSUMER", False)
        casts.clear()
        without = unet(**inputs).sample
        n_casts_without = len(casts)  # read now: the plain call below casts too
        monkeypatch.setattr(fln, "ENABLED", False)
        plain = unet(**inputs).sample
    assert n_fused == 3 * len(_blocks(unet)), f"the LayerNorm kernel wrote {n_fused} casts"
    assert n_casts_without - n_casts == n_fused, "a consumer cast its input again"
    # Not bit-identical to ``without``: the casting kernel is a separate compilation whose row sums may round a few
    # outputs to the neighbouring bf16 value (tests/kernels/test_layer_norm.py); each consumer's cast is exactly
    # its own cast of the norm's output, checked there.
    for other in (without, plain):
        assert (with_cast.float() - other.float()).abs().max() <= 2**-5 * other.float().abs().max()
