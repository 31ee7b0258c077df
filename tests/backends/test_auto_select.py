"""Backend selection for ``backend='auto'`` (CPU only: the GPU is faked through ``device_capability``)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import fpq_plugin.backends as B
from fpq_plugin.kernels import backend as kb
from fpq_plugin.nn import QConv2d, QLinear


@pytest.fixture()
def gpu(monkeypatch):
    """Registers the kernel backends and fakes a CUDA device whose capability the test sets."""
    kb.register_kernel_backends()
    cap = {"value": (9, 0)}
    monkeypatch.setattr(kb, "device_capability", lambda device: cap["value"])
    monkeypatch.setattr(kb, "_triton_ok", lambda: True)
    monkeypatch.setattr(B, "_warned", set())
    return cap


def cuda_x(dtype=torch.bfloat16):
    # stand-in for a CUDA tensor: selection reads only these attributes
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype)


def layer(kind="linear", w="e4m3fn", a="e4m3fn"):
    if kind == "linear":
        return QLinear(64, 32, w, a)
    return QConv2d(16, 32, 3, w, a, padding=1)


def pick(lyr, x):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        name = B._auto_pick(lyr, x).name
    return name, [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]


def test_order_after_registration(gpu):
    assert B.AUTO_ORDER[:3] == ["fp8", "decode", "dequant"]


@pytest.mark.parametrize("w", ["e4m3fn", "e2m1", "e3m0", "e1m2"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fp8_on_hopper_and_ada(gpu, w, kind):
    for cap in ((8, 9), (9, 0), (10, 0)):
        gpu["value"] = cap
        assert pick(layer(kind, w), cuda_x()) == ("fp8", [])


def test_ampere_falls_back_to_decode_with_one_warning(gpu):
    gpu["value"] = (8, 0)
    name, msgs = pick(layer(), cuda_x())
    assert name == "decode"
    assert len(msgs) == 1 and "8.0" in msgs[0] and "fp8" in msgs[0] and "falling back" in msgs[0]
    assert pick(layer(), cuda_x()) == ("decode", [])  # once per reason


@pytest.mark.parametrize("w", ["e4m3fn", "e2m1", "int4"])
def test_weight_only_goes_to_decode_without_warning(gpu, w):
    assert pick(layer(w=w, a=None), cuda_x()) == ("decode", [])


def test_int8_activations_use_dequant(gpu):
    assert pick(layer(w="int8", a="int8"), cuda_x())[0] == "dequant"


def test_research_8bit_weights_skip_fp8(gpu):
    assert pick(layer(w="e3m4"), cuda_x())[0] == "decode"


def test_no_triton_warns_and_uses_dequant(gpu, monkeypatch):
    monkeypatch.setattr(kb, "_triton_ok", lambda: False)
    name, msgs = pick(layer(), cuda_x())
    assert name == "dequant"
    assert len(msgs) == 2 and all("triton" in m for m in msgs)


def test_cpu_input_uses_dequant_silently(gpu):
    x = torch.randn(3, 64)
    assert pick(layer(), x) == ("dequant", [])


def test_dispatch_caches_the_choice_and_matches_reference():
    torch.manual_seed(0)
    lin = QLinear(64, 32, "e4m3fn", "e4m3fn")
    lin.weight_codes = torch.randint(0, 126, (32, 64), dtype=torch.uint8)
    lin.weight_scale = torch.rand(32) / 64
    lin.set_input_quantizer(0.01)
    x = torch.randn(5, 64)
    y1, y2 = lin(x), lin(x)
    assert lin in B._AUTO_CACHE and B._AUTO_CACHE[lin][1].__self__.name == "dequant"
    ref = B.get_backend("reference").linear(lin, x)
    torch.testing.assert_close(y1, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, y1)


def test_dispatch_cache_is_not_pickled():
    import copy
    import pickle

    lin = QLinear(16, 8, "e4m3fn", None)
    lin(torch.randn(2, 16))
    assert "_fpq_auto" not in lin.__dict__
    pickle.loads(pickle.dumps(lin))
    copy.deepcopy(lin)


def test_first_use_of_a_backend_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(B, "_announced", set())
    lin = QLinear(16, 8, "e4m3fn", "e4m3fn")
    lin.set_input_quantizer(0.01)
    with caplog.at_level("INFO", logger="fpq_plugin.backends"):
        lin(torch.randn(2, 16))
        QLinear(16, 8, "e4m3fn", None)(torch.randn(2, 16))  # another layer, same kind, backend and device
    lines = [r.getMessage() for r in caplog.records if "runs quantized" in r.getMessage()]
    assert lines == ["fpq: backend 'auto' runs quantized linear layers on 'dequant' (cpu, float32 input)"]


def test_a_layer_compiled_before_any_eager_call_traces_one_graph(monkeypatch):
    """torch.compile of a layer that never ran eagerly picks its backend inside the trace: the fallback messages
    (logging, warnings) must stay out of it, or Dynamo breaks the graph (fullgraph=True raises)."""
    kb.register_kernel_backends()
    monkeypatch.setattr(B, "_warned", set())  # so the 'not using fp8' message would be due now
    torch._dynamo.reset()
    lyr = QLinear(64, 32, "e2m1", None)
    x = torch.randn(5, 64)
    want = B.get_backend("dequant").linear(lyr, x)
    got = torch.compile(lyr, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, want)
