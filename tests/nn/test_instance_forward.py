"""fpq_plugin.nn.instance_forward: installing a per-instance forward, and which norm calls a fused kernel may take."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fpq_plugin.nn.instance_forward import has_forward, install_forward, norm_call_is_plain, remove_forward


def _doubled(self, x):
    return 2 * type(self).forward(self, x)


def test_the_forward_is_per_instance_survives_deepcopy_and_comes_off():
    a, b = nn.Identity(), nn.Identity()
    install_forward(a, "_flag", _doubled)
    x = torch.ones(3)
    assert torch.equal(a(x), 2 * x) and torch.equal(b(x), x) and has_forward(a, "_flag")
    clone = copy.deepcopy(a)
    assert torch.equal(clone(x), 2 * x) and clone.forward.__self__ is clone
    remove_forward(a, "_flag")
    assert torch.equal(a(x), x) and not has_forward(a, "_flag")
    remove_forward(a, "_flag")  # a no-op the second time


class _ComfyStyleNorm(nn.GroupNorm):
    """ComfyUI's ops keep these as class attributes and set them per instance when a model is offloaded or patched."""

    comfy_cast_weights = False
    weight_function: list = []
    bias_function: list = []


def test_a_plain_call_is_one_tensor_without_autograd_or_comfyui_weight_handling():
    norm, x = nn.GroupNorm(2, 4), torch.randn(1, 4, 2, 2)
    with torch.no_grad():
        assert norm_call_is_plain(norm, x, (), {})
        assert not norm_call_is_plain(norm, x, (1,), {})
        assert not norm_call_is_plain(norm, x, (), {"eps": 1e-3})
        assert not norm_call_is_plain(norm, [x], (), {})
    assert not norm_call_is_plain(norm, x, (), {})  # grad mode and a trainable weight: autograd must see the op
    comfy = _ComfyStyleNorm(2, 4)
    with torch.no_grad():
        assert norm_call_is_plain(comfy, x, (), {})
        for name, value in (("comfy_cast_weights", True), ("weight_function", [abs]), ("bias_function", [abs])):
            setattr(comfy, name, value)
            assert not norm_call_is_plain(comfy, x, (), {}), name
            delattr(comfy, name)
        _ComfyStyleNorm.comfy_cast_weights = True  # set on the class, as ComfyUI's manual-cast ops do
        try:
            assert not norm_call_is_plain(comfy, x, (), {})
        finally:
            _ComfyStyleNorm.comfy_cast_weights = False
