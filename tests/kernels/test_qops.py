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
