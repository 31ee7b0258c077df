"""The kernel backends' per-layer prepared state (``fpq_plugin.kernels.backend._state``), on the CPU: it is built
from the layer's buffers and rebuilt when they change. No kernel runs here, so no GPU is needed."""

from __future__ import annotations

import gc
import weakref

import torch

from fpq_plugin.kernels import backend as kb
from fpq_plugin.nn import QLinear
from fpq_plugin.quantizers import quantize_weight


def _layer() -> QLinear:
    layer = QLinear(32, 16, "e4m3fn", "e4m3fn", bias=True)
    layer.set_weight(quantize_weight(torch.randn(16, 32), layer.weight_format, granularity="channel"))
    layer.set_input_quantizer(0.05)
    return layer


def test_state_is_cached_and_rebuilt_when_a_buffer_is_replaced() -> None:
    layer = _layer()
    first = kb._state(layer)
    assert kb._state(layer) is first
    layer.set_input_quantizer(0.1)  # a new input_scale tensor
    second = kb._state(layer)
    assert second is not first and second.xs.item() == torch.tensor(0.1).item()


def test_state_is_rebuilt_after_an_in_place_write() -> None:
    layer = _layer()
    first = kb._state(layer)
    with torch.no_grad():
        layer.weight_scale.mul_(2)  # same tensor, new version
    assert kb._state(layer) is not first


def test_state_of_a_layer_made_in_inference_mode() -> None:
    """ComfyUI builds and runs models under torch.inference_mode: their buffers are inference tensors, which have no
    version counter (reading it raised 'Inference tensors do not track version counter' on the GPU)."""
    with torch.inference_mode():
        layer = _layer()
        assert layer.weight_codes.is_inference()
        first = kb._state(layer)
        assert kb._state(layer) is first
        layer.set_input_quantizer(0.1)
        assert kb._state(layer) is not first
    # and outside inference mode too (the node's method runs with inference mode off)
    assert kb._state(layer) is kb._state(layer)


def test_state_of_a_layer_made_in_inference_mode_and_moved_outside_it() -> None:
    """Its bias Parameter then has no version counter although it is no longer an inference tensor."""
    with torch.inference_mode():
        layer = _layer()
    layer.to(torch.float64).to(torch.float32)  # what a model unload outside inference mode does
    assert not layer.bias.is_inference()
    assert kb._state(layer) is kb._state(layer)


def test_a_layer_without_version_counters_is_not_asked_for_them_on_every_call(monkeypatch) -> None:
    """Asking an inference tensor for its version raises, and the exception costs ~9 us: ComfyUI's eager SD1.5
    forward spent 12 ms of host time in it. The state check asks only tensors that had a counter."""
    with torch.inference_mode():
        layer = _layer()
        first = kb._state(layer)
    assert all(entry[1] < 0 for entry in first.key if entry is not None)
    asked = []
    real = kb._version
    monkeypatch.setattr(kb, "_version", lambda t: asked.append(t) or real(t))
    for _ in range(3):
        assert kb._state(layer) is first
    assert asked == []
    # the same objects with new storage are still noticed
    with torch.inference_mode():
        layer.weight_scale.data = layer.weight_scale.data * 2
    assert kb._state(layer) is not first


def test_an_inference_activation_is_not_asked_for_its_version(monkeypatch) -> None:
    layer = _layer()
    st = kb._state(layer)
    asked = []
    real = kb._version
    monkeypatch.setattr(kb, "_version", lambda t: asked.append(t) or real(t))
    with torch.inference_mode():
        x = torch.randn(4, 32)
        kb._remember_cast(x, st, False, x)
        kb.offer_cast(x, st, x)
    assert asked == []
    y = torch.randn(4, 32)
    kb._remember_cast(y, st, False, y)  # an ordinary tensor is asked: its version decides sharing
    assert len(asked) == 1


def test_moving_a_layer_releases_its_state_and_the_old_tensors() -> None:
    """ComfyUI offloads a model (``.to(offload_device)``) to free VRAM: the state prepared from the GPU tensors must
    not keep them alive."""
    kb.register_kernel_backends()  # installs the release hook
    layer = _layer()
    old_codes = weakref.ref(layer.weight_codes)
    kb._state(layer)
    layer.to("meta")  # a device move: every tensor of the layer is replaced
    gc.collect()
    assert layer not in kb._STATES
    assert old_codes() is None


def _cast_counter(monkeypatch):
    """Replace the kernel behind ``_cast`` by a counting PyTorch stand-in (the sharing logic is what is tested)."""
    calls = []
    monkeypatch.setattr(kb, "_cast_once", lambda x, st, grid_out: calls.append(x) or (x * 2))
    monkeypatch.setattr(kb, "_LAST_CAST", [None])
    return calls


def test_consecutive_layers_share_the_cast_of_one_input(monkeypatch) -> None:
    calls = _cast_counter(monkeypatch)
    q_layer, k_layer, v_layer = _layer(), _layer(), _layer()  # equal input scales, as to_q/to_k/to_v calibrate
    x = torch.randn(4, 32)
    outs = [kb._cast(x.reshape(-1, 32), kb._state(m), False) for m in (q_layer, k_layer, v_layer)]
    assert len(calls) == 1 and outs[0] is outs[1] is outs[2]


def test_a_cast_is_not_shared_across_scales_writes_or_other_tensors(monkeypatch) -> None:
    calls = _cast_counter(monkeypatch)
    a, b = _layer(), _layer()
    b.set_input_quantizer(0.07)
    x = torch.randn(4, 32)
    kb._cast(x, kb._state(a), False)
    kb._cast(x, kb._state(b), False)  # another scale
    assert len(calls) == 2
    kb._cast(x, kb._state(b), True)  # grid values, not fp8
    assert len(calls) == 3
    x.add_(1)  # the same tensor, written in place
    kb._cast(x, kb._state(b), True)
    assert len(calls) == 4
    kb._cast(x.clone(), kb._state(b), True)  # equal values, another tensor
    assert len(calls) == 5
    monkeypatch.setattr(kb, "SHARE_ACTIVATION_CASTS", False)
    y = torch.randn(4, 32)
    kb._cast(y, kb._state(b), True)
    kb._cast(y, kb._state(b), True)
    assert len(calls) == 7


def test_inference_mode_tensors_never_share_a_cast(monkeypatch) -> None:
    calls = _cast_counter(monkeypatch)
    layer = _layer()
    with torch.inference_mode():
        x = torch.randn(4, 32)  # no version counter: an in-place write could not be seen
        kb._cast(x, kb._state(layer), False)
        kb._cast(x, kb._state(layer), False)
    assert len(calls) == 2


def test_an_offered_cast_is_used_by_the_consumer_until_its_input_changes(monkeypatch) -> None:
    calls = _cast_counter(monkeypatch)
    layer = _layer()
    st = kb._state(layer)
    x = torch.randn(4, 32)
    offered = torch.randn(4, 32)
    kb.offer_cast(x, st, offered)
    assert kb._cast(x, st, False) is offered and kb._cast(x, st, False) is offered and not calls
    other = _layer()
    other.set_input_quantizer(0.07)
    assert kb._cast(x, kb._state(other), False) is not offered  # another scale: its own cast
    kb.offer_cast(x, st, offered)
    x.mul_(2)
    assert kb._cast(x, st, False) is not offered and len(calls) == 2


def test_an_offered_cast_of_an_inference_tensor_is_used_once(monkeypatch) -> None:
    """No version counter: the cast is handed to the next cast call only (the producer's consumer)."""
    calls = _cast_counter(monkeypatch)
    layer = _layer()
    st = kb._state(layer)
    with torch.inference_mode():
        x = torch.randn(4, 32)
        offered = torch.randn(4, 32)
        kb.offer_cast(x, st, offered)
        assert kb._cast(x, st, False) is offered and not calls
        assert kb._cast(x, st, False) is not offered and len(calls) == 1


def test_cast_ahead_names_the_layers_whose_cast_a_producer_can_write(monkeypatch) -> None:
    layer = _layer()  # K=32, N=16, e4m3 input with a static scale
    assert kb.cast_ahead(layer, 8, 32) is None, "an 'auto' layer not yet run on the GPU has no known backend"
    layer._fpq_auto_backend = "fp8"  # what dispatch records after the first CUDA call
    assert kb.cast_ahead(layer, 8, 32) is kb._state(layer)
    assert kb.cast_ahead(layer, 8, 48) is None  # another width than the layer's K
    layer.backend = "decode"
    assert kb.cast_ahead(layer, 8, 32) is None
    layer.backend = "fp8"
    assert kb.cast_ahead(layer, 8, 32) is kb._state(layer)
    monkeypatch.setattr(kb, "FP8_LINEAR_METHOD", "fused")  # the fused kernel casts inside the GEMM
    assert kb.cast_ahead(layer, 8, 32) is None
    monkeypatch.setattr(kb, "FP8_LINEAR_METHOD", "auto")
    kb._state(layer).cublas_bad.add(8)  # a shape cuBLAS refused runs the fused kernel
    assert kb.cast_ahead(layer, 8, 32) is None and kb.cast_ahead(layer, 16, 32) is not None
    monkeypatch.setattr(kb, "SHARE_ACTIVATION_CASTS", False)
    assert kb.cast_ahead(layer, 16, 32) is None
    e5 = QLinear(32, 16, "e4m3fn", "e5m2", bias=False)
    e5.set_weight(quantize_weight(torch.randn(16, 32), e5.weight_format, granularity="channel"))
    e5.set_input_quantizer(0.05)
    e5.backend = "fp8"
    monkeypatch.setattr(kb, "SHARE_ACTIVATION_CASTS", True)
    assert kb.cast_ahead(e5, 16, 32) is None  # e5m2 activations take the fused kernel, not cuBLAS
