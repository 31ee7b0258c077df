"""The norm and GEGLU wrappers' call-site launch caches (``qops.CallSiteLaunches``): a repeat call goes through
the stored launch and gives the bits of the first, uncached path; an input that differs in what Triton specialises
on (16-byte alignment, shape, dtype) gets its own entry. Caching needs compiled kernels, so these run on the GPU
(``-m gpu``; the interpreter never stores an entry, which the last test checks on the CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_cuda_triton as needs_cuda
from helpers import interp

from fpq_plugin.kernels import geglu as geglu_mod
from fpq_plugin.kernels import group_norm as group_norm_mod
from fpq_plugin.kernels import layer_norm as layer_norm_mod
from fpq_plugin.kernels import qops


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x`` whose address is 2 bytes past a 16-byte boundary."""
    flat = torch.empty(x.numel() + 8, dtype=x.dtype, device=x.device)
    out = flat[1 : 1 + x.numel()].view(x.shape)
    out.copy_(x)
    assert out.data_ptr() % 16 and out.is_contiguous()
    return out


def _calls(device: str):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.float16)

    xs = torch.tensor([0.05], device=device)
    w, b = rnd(320), rnd(320)
    return {
        "group_norm": (group_norm_mod, lambda x: group_norm_mod.group_norm(x, 32, w, b, 1e-5), lambda: rnd(2, 320, 16, 16)),
        "layer_norm": (layer_norm_mod, lambda x: layer_norm_mod.layer_norm(x, w, b, 1e-5), lambda: rnd(2, 64, 320)),
        "layer_norm_and_cast": (layer_norm_mod, lambda x: layer_norm_mod.layer_norm_and_cast(x, w, b, 1e-5, xs),
                                lambda: rnd(2, 64, 320)),
        "geglu": (geglu_mod, lambda y: geglu_mod.geglu(y), lambda: rnd(2, 64, 640)),
        "geglu_and_cast": (geglu_mod, lambda y: geglu_mod.geglu_and_cast(y, xs), lambda: rnd(2, 64, 640)),
    }


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _bits(out) -> list[torch.Tensor]:
    return [t.view(torch.uint8) if t.dtype.itemsize == 1 else t for t in _outputs(out)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["group_norm", "layer_norm", "layer_norm_and_cast", "geglu", "geglu_and_cast"])
def test_repeat_calls_replay_the_stored_launch_bit_for_bit(name, monkeypatch):
    mod, fn, make = _calls("cuda")[name]
    x1, x2 = make(), make()
    fn(x1)  # compiles and stores
    stored = len(mod._LAUNCHES)
    assert stored >= 1, "no entry stored: every call recomputes its launch"
    cached = _bits(fn(x2))
    monkeypatch.setattr(qops, "CALL_SITE_LAUNCHES", False)
    uncached = _bits(fn(x2))
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))
    monkeypatch.setattr(qops, "CALL_SITE_LAUNCHES", True)
    # a misaligned input is a different specialisation: its own entry, and the same values (the kernels' arithmetic
    # does not depend on how wide their loads are; one fp16/fp8 rounding of slack all the same)
    misaligned = _outputs(fn(_misaligned(x2)))
    assert len(mod._LAUNCHES) == stored + 1
    for a, b in zip(misaligned, _outputs(fn(x2))):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.13, atol=1e-3)


@interp
def test_the_interpreter_stores_no_launch():
    for name, (mod, fn, make) in _calls("cpu").items():
        before = len(mod._LAUNCHES)
        fn(make())
        assert len(mod._LAUNCHES) == before, name
