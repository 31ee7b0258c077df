"""The launch helpers of fpq_plugin.kernels.qops that run without a GPU."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from fpq_plugin.kernels.qops import launch_hooks_idle

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install -e '.[gpu]'); CI has none")


@needs_triton
def test_cached_launches_stay_on_with_the_installed_triton():
    """Triton 3.5+ keeps launch hooks in HookChain objects that are never None: the cached launch must still be
    used while no hook is installed, and must step aside while one is (a profiler's, for example)."""
    import triton

    runtime = triton.knobs.runtime
    assert launch_hooks_idle(runtime)
    hook = runtime.launch_enter_hook
    if hasattr(hook, "add"):
        def seen(*_a, **_k):
            return None

        hook.add(seen)
        try:
            assert not launch_hooks_idle(runtime)
        finally:
            hook.remove(seen)
        assert launch_hooks_idle(runtime)


def test_function_style_hooks_of_older_triton():
    assert launch_hooks_idle(SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None))
    assert not launch_hooks_idle(SimpleNamespace(launch_enter_hook=lambda *a: None, launch_exit_hook=None))


class _RecordingKernel:
    """Stands in for a compiled Triton kernel: records what a cached launch hands its ``run``."""

    function = packed_metadata = None

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


def test_cached_launches_pass_int_pointers_only_inside_the_capture_context(monkeypatch):
    import torch

    from fpq_plugin.kernels import qops

    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 0, raising=False)  # CPU builds lack it
    ck = _RecordingKernel()
    launch = qops.Launch(ck, (4,), {"BLOCK": 64})
    x, out = torch.ones(8), torch.empty(8)
    launch(0, x, out, 8)
    with qops.pointer_args_as_ints():
        launch(0, x, out, 8)
    launch(0, x, out, 8)
    outside, inside, after = (c[9:] for c in ck.calls)  # after grid (3), stream, function, metadata, 3 hooks
    assert outside[0] is x and outside[1] is out and outside[2:] == (8, 64)
    assert inside == (x.data_ptr(), out.data_ptr(), 8, 64)
    assert after[0] is x, "the context must restore tensor arguments"


@needs_triton
def test_binder_launches_are_counted_inside_the_context_only(monkeypatch):
    from triton.runtime.jit import JITFunction

    from fpq_plugin.kernels import qops

    ran = []
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: ran.append(a) or "launched")
    with qops.count_triton_binder_launches() as count:
        assert JITFunction.run(None, 1, grid=(1,)) == "launched"  # the original still runs
        JITFunction.run(None, 2)
    JITFunction.run(None, 3)
    assert count == [2] and len(ran) == 3
