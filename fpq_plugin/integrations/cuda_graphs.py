"""Replay a UNet's forward from CUDA graphs, so eager callers (ComfyUI, diffusers pipelines) stop paying its host time.

Why: on an H100/H200 an eager UNet forward is bound by the host, not the GPU. SD1.5 at batch 2 (H200,
``benchmarks/results/unet_h200_launch_fix.json``): bf16 eager 30.4 ms, fpq W8A8 eager 48.0 ms, and the *same*
fpq kernels replayed from a CUDA graph 15.2 ms. A quantized layer launches more small kernels than a float one, so
eager mode hides exactly what quantization saves; a graph replay launches the whole forward at once.

How: :class:`GraphedForward` replaces ``module.forward``. Each call's *signature* is the structure of its arguments
(a pytree), every tensor's shape, strides, dtype and device, and every other argument's value. The first call of a
signature runs the forward eagerly ``warmup`` times on a side stream (fpq's layers build their launch caches then),
then captures it; every later call with that signature copies its tensors into the captured input buffers, replays,
and returns copies of the outputs (a later replay overwrites the captured ones). At most ``max_graphs`` signatures
are kept (least recently used is dropped); all graphs of one module share one memory pool, which is safe because
replays run one at a time on one stream and outputs are copied out before the next.

A call runs eagerly instead, with a one-time log line saying why, whenever a replay could be wrong:
autograd on, training mode, ``torch.compile`` tracing, an argument that is not a tensor or a plain value (a
callable, an object), inputs not on a CUDA device, weights not all on the input's device (CPU offload), or a
``check`` hook of the front door refusing (ComfyUI: patches or ControlNet present). Under PyTorch's cudaMallocAsync
allocator (ComfyUI's default) a failed capture aborts the process, so there a signature is captured only when its
last warm-up launched no Triton kernel through Triton's Python binder (which checks pointers with the driver, and
that check fails inside such a capture), and fpq's cached launches pass plain-int pointers while it runs. The weights a graph reads are
checked by address and in-place version on every call: a weight replaced or written (LoRA patching, a device
move, reloading) drops every graph, so no graph reads freed memory or stale derived state. A capture that fails
(a forward that synchronises, for example) leaves that signature eager for good, and a module whose signatures
keep changing (more than ``4 * max_graphs`` evictions) goes eager with a warning instead of capturing every call.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

logger = logging.getLogger(__name__)

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)
_DATA_PTR = torch.Tensor.data_ptr
_SMALL_HOST_TENSOR = 64  # CPU tensors up to this many elements (timesteps) are copied into device buffers

Check = Callable[[tuple, dict], "str | None"]

# Under PyTorch's cudaMallocAsync allocator (ComfyUI's default) a capture is made only when the last warm-up ran no
# Triton kernel through Triton's Python binder, and it runs with fpq's cached launches passing plain-int pointers
# (fpq_plugin.kernels.qops.pointer_args_as_ints): a failed capture there aborts the whole process. False: never
# capture under that allocator.
CAPTURE_UNDER_ASYNC_ALLOCATOR = True
#: Under cudaMallocAsync, warm-ups the capture may add while the last one still launched through Triton's binder (a
#: launch seen for the first time caches itself; one that goes through the binder on every call never stops).
ASYNC_EXTRA_WARMUPS = 2

ASYNC_ALLOCATOR_REASON = (
    "PyTorch's cudaMallocAsync allocator is on (PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync, which ComfyUI sets "
    "by default), and graph capture under it is switched off (CAPTURE_UNDER_ASYNC_ALLOCATOR); running eagerly. To "
    "replay graphs, start ComfyUI with --disable-cuda-malloc (or drop that setting)"
)
BINDER_LAUNCH_REASON = (
    "{n} Triton kernel launch(es) in the last warm-up went through Triton's Python launcher, which checks each "
    "pointer with the driver; inside a capture under the cudaMallocAsync allocator that check fails and PyTorch "
    "aborts the process, so this input shape runs eagerly (start ComfyUI with --disable-cuda-malloc to replay it)"
)


@functools.cache  # asked once a CUDA tensor exists, when the allocator backend is fixed for the process
def async_allocator_active() -> bool:
    """True when PyTorch's CUDA allocator is the cudaMallocAsync backend (a capture needs the guards above)."""
    return torch.cuda.is_available() and torch.cuda.get_allocator_backend() == "cudaMallocAsync"


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor | None]  # per argument leaf: the captured buffer (None: not a tensor)
    outputs: list[Any]
    out_spec: Any


class GraphedForward:
    """``module.forward`` replayed from CUDA graphs, one per call signature (see the module docstring).

    Args:
        module: the module whose weights the graphs read (checked by address on every call).
        forward: the eager forward (``module``'s original bound ``forward``).
        max_graphs: signatures kept at once; each holds its input buffers, and the pool holds one forward's
            activations.
        warmup: eager runs before a capture.
        check: ``check(args, kwargs) -> reason | None``; a reason makes that call eager.
        timestep_arg: name and position of a timestep argument that may come as a Python number; it is turned
            into a tensor (float64 / int64, as diffusers does) so a new timestep does not mean a new signature.
        ignored_kwargs: keyword arguments left out of the signature: the capture receives them, replays ignore
            them. Only for arguments the forward's computation does not depend on, which ``check`` must ensure
            (ComfyUI's ``transformer_options`` without patches: bookkeeping the UNet writes and patches read).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        forward: Callable[..., Any],
        *,
        max_graphs: int = 3,
        warmup: int = 2,
        check: Check | None = None,
        timestep_arg: tuple[str, int] | None = ("timestep", 1),
        ignored_kwargs: tuple[str, ...] = (),
    ) -> None:
        if max_graphs < 1 or warmup < 1:
            raise ValueError(f"max_graphs ({max_graphs}) and warmup ({warmup}) must be at least 1")
        self.module = module
        self.forward = forward
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.check = check
        self.timestep_arg = timestep_arg
        self.ignored_kwargs = tuple(ignored_kwargs)
        self.stats: Counter[str] = Counter()  # "replay", "capture", "eager", "evicted", "failed"
        self._graphs: OrderedDict[Any, _Graph] = OrderedDict()
        self._failed: set = set()
        self._pool: Any = None
        self._weights: tuple | None = None  # addresses the graphs were captured with
        self._slots: list | None = None  # built on the first CUDA call (a deep copy calls __init__ half-built)
        self._checked: tuple | None = None  # (device, addresses) last found all on that device
        self._noted: set[str] = set()
        self.disabled: str | None = None

    # -- public ---------------------------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._tensorize_timestep(args, kwargs)
        passed = {k: kwargs[k] for k in self.ignored_kwargs if k in kwargs}
        signed = {k: v for k, v in kwargs.items() if k not in passed} if passed else kwargs
        reason, key, leaves, spec = self._plan(args, signed, kwargs)
        if reason is not None:
            self.stats["eager"] += 1
            if reason:  # "" = eager for a reason not worth a message (compiling, capturing, CPU module)
                self._note(reason)
            return self.forward(*args, **kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, leaves, spec, passed)
            if entry is None:
                self.stats["eager"] += 1
                return self.forward(*args, **kwargs)
        else:
            self._graphs.move_to_end(key)
        for buf, leaf in zip(entry.inputs, leaves):
            if buf is not None and buf is not leaf:
                buf.copy_(leaf)
        entry.graph.replay()
        self.stats["replay"] += 1
        outs = [o.clone() if isinstance(o, torch.Tensor) else o for o in entry.outputs]
        return pytree.tree_unflatten(outs, entry.out_spec)

    def release(self) -> None:
        """Drop every graph, its buffers and the pool (the memory returns to PyTorch's caching allocator)."""
        self._graphs.clear()
        self._pool = None
        self._weights = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __deepcopy__(self, memo: dict) -> GraphedForward:
        # A copied module gets its own, empty graphs (graphs cannot be copied and would read the original's weights).
        import copy

        module = copy.deepcopy(self.module, memo)
        return GraphedForward(
            module,
            copy.deepcopy(self.forward, memo),
            max_graphs=self.max_graphs,
            warmup=self.warmup,
            check=self.check,
            timestep_arg=self.timestep_arg,
            ignored_kwargs=self.ignored_kwargs,
        )

    # -- deciding -------------------------------------------------------------------------------------------------

    def _tensorize_timestep(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.timestep_arg is None:
            return args, kwargs
        name, pos = self.timestep_arg
        if name in kwargs:
            t = kwargs[name]
            if isinstance(t, (int, float)) and not isinstance(t, bool):
                kwargs = {**kwargs, name: torch.tensor(t, dtype=torch.int64 if isinstance(t, int) else torch.float64)}
        elif len(args) > pos:
            t = args[pos]
            if isinstance(t, (int, float)) and not isinstance(t, bool):
                t = torch.tensor(t, dtype=torch.int64 if isinstance(t, int) else torch.float64)
                args = (*args[:pos], t, *args[pos + 1 :])
        return args, kwargs

    def _plan(self, args: tuple, kwargs: dict, all_kwargs: dict) -> tuple[str | None, Any, list, Any]:
        """(reason to run eagerly or None, signature, argument leaves, their structure) of ``args, kwargs`` (the
        signed arguments); ``check`` sees every argument."""
        if torch.compiler.is_compiling() or not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
            return "", None, [], None
        if self.disabled is not None:
            return "", None, [], None
        leaves, spec = pytree.tree_flatten((args, kwargs))
        device = next((x.device for x in leaves if isinstance(x, torch.Tensor) and x.is_cuda), None)
        if device is None:
            return "", None, [], None  # a CPU call: nothing to replay
        if async_allocator_active() and not CAPTURE_UNDER_ASYNC_ALLOCATOR:
            # Triton's launcher checks every pointer with the driver, and memory that cudaMallocAsync hands out
            # inside a capture is not mapped until the graph runs: the capture fails, and PyTorch aborts the
            # process when that capture's allocations are freed (seen in ComfyUI on an H200).
            self.disabled = ASYNC_ALLOCATOR_REASON
            logger.warning("fpq: CUDA graphs off: %s", self.disabled)
            return "", None, [], None
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return "autograd is on (call under torch.no_grad() or torch.inference_mode())", None, [], None
        if self.module.training:
            return "the module is in training mode (call .eval())", None, [], None
        parts: list[Any] = []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                if x.device != device and not (x.device.type == "cpu" and x.numel() <= _SMALL_HOST_TENSOR):
                    return f"an argument is on {x.device}, another on {device}", None, [], None
                if x.requires_grad and torch.is_grad_enabled():
                    return "an argument requires grad", None, [], None
                parts.append((tuple(x.shape), x.stride(), x.dtype, x.device.type))
            elif isinstance(x, _PLAIN):
                if isinstance(x, float) and math.isnan(x):
                    return "an argument is NaN", None, [], None
                parts.append((type(x), x))
            else:
                return f"an argument of type {type(x).__name__} (only tensors and plain values)", None, [], None
        if self.check is not None:
            reason = self.check(args, all_kwargs)
            if reason:
                return reason, None, [], None
        weights = self._weight_addresses(device)
        if weights is None:
            return f"weights are not all on {device} (offloaded?)", None, [], None
        if weights != self._weights:
            if self._graphs:
                logger.info(
                    "fpq: the UNet's weights moved or were replaced; dropping %d CUDA graph(s)", len(self._graphs)
                )
            self.release()
            self._weights = weights
        # inference mode is part of the key: buffers captured under it cannot be written outside it
        key = (spec, tuple(parts), device, torch.is_inference_mode_enabled())
        if key in self._failed:
            return "", None, [], None
        return None, key, leaves, spec

    @staticmethod
    def _weight_slots(module: torch.nn.Module) -> list[tuple[dict, str]]:
        # (dict, name) pairs, not tensors: reading module._parameters[name] each call sees a replaced Parameter.
        slots = []
        for m in module.modules():
            slots += [(m._parameters, n) for n in m._parameters]
            slots += [(m._buffers, n) for n in m._buffers]
        return slots

    def _weight_addresses(self, device: torch.device) -> tuple | None:
        """(address, in-place version) of every parameter and buffer, or None when one is not on ``device``.

        Runs on every call (2100 tensors on SDXL), so it is kept to two C calls per tensor: the device is only
        checked when the addresses differ from the last call's (same storage, same device), and inference tensors
        (ComfyUI makes its models under inference mode), which have no version counter, are asked
        ``is_inference()`` instead of raising on ``_version`` one by one (an exception per tensor cost 18 ms per
        call on 2100 tensors; this check costs 0.3-0.6 ms on a CPU).
        """
        if self._slots is None:
            self._slots = self._weight_slots(self.module)
        tensors = [d.get(name) for d, name in self._slots]
        try:
            ptrs = tuple(map(_DATA_PTR, tensors))
        except TypeError:  # an empty slot (a module's bias=None)
            ptrs = tuple(0 if t is None else t.data_ptr() for t in tensors)
        # an in-place write (load_state_dict, LoRA patching) bumps the version: fpq layers rebuild derived state then
        try:
            versions = tuple([t._version for t in tensors])
        except (RuntimeError, AttributeError):  # inference tensors have no version counter; empty slots
            versions = tuple(0 if t is None or t.is_inference() else t._version for t in tensors)
        if (device, ptrs) != self._checked:
            if any(t is not None and t.device != device for t in tensors):
                return None
            self._checked = (device, ptrs)
        return ptrs, versions

    def _note(self, reason: str) -> None:
        if reason not in self._noted:
            self._noted.add(reason)
            logger.info("fpq: CUDA graphs: running this call eagerly: %s", reason)

    # -- capturing ------------------------------------------------------------------------------------------------

    def _capture(self, key: Any, leaves: list, spec: Any, passed: dict) -> _Graph | None:
        device = key[2]
        inputs = [self._buffer(x, device) if isinstance(x, torch.Tensor) else None for x in leaves]
        static = [b if b is not None else x for b, x in zip(inputs, leaves)]

        def run():
            # Each run gets its own argument containers: a forward may consume them (ComfyUI's UNet pops each
            # ControlNet residual off the lists it is given), and the next warm-up or the capture must see them whole.
            args, kwargs = pytree.tree_unflatten(static, spec)
            return self.forward(*args, **kwargs, **passed)

        if len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
            self.stats["evicted"] += 1
            if self.stats["evicted"] > 4 * self.max_graphs:
                self.disabled = (
                    f"the call signature changed {self.stats['evicted']} times (shapes or arguments "
                    "differ from call to call)"
                )
                logger.warning("fpq: CUDA graphs off for this model: %s; running eagerly", self.disabled)
                self.release()
                return None
        start = time.perf_counter()
        guarded = async_allocator_active()
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup - 1 if guarded else self.warmup):
                    run()
                # Under the async allocator the last warm-up takes the capture's code path exactly (int pointers)
                # and counts binder launches. A fresh model can launch a kernel for the first time in its second
                # call (a producer that writes its consumer's fp8 input once that consumer has picked its backend
                # in the first call), and that first launch is what caches it: try again before giving up.
                for _ in range(1 + ASYNC_EXTRA_WARMUPS if guarded else 0):
                    with _capture_launches(), _binder_launches() as binder:
                        run()
                    if not binder[0]:
                        break
            torch.cuda.current_stream(device).wait_stream(side)
            if guarded and binder[0]:
                self._failed.add(key)
                self._note(BINDER_LAUNCH_REASON.format(n=binder[0]))
                return None
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: a server (ComfyUI) runs the sampler in a worker thread while its web thread may ask
            # the device for memory stats; those calls are not part of this capture and must not abort it.
            with _capture_launches(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = run()
        except Exception as e:  # noqa: BLE001 - any capture failure means: this signature runs eagerly
            self._failed.add(key)
            self.stats["failed"] += 1
            logger.warning(
                "fpq: CUDA graph capture failed (%s: %s); this input shape runs eagerly",
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            return None
        outputs, out_spec = pytree.tree_flatten(out)
        if not all(isinstance(o, (torch.Tensor, *_PLAIN)) for o in outputs):
            self._failed.add(key)
            self._note("the forward returned something other than tensors and plain values")
            return None
        entry = _Graph(graph, inputs, outputs, out_spec)
        self._graphs[key] = entry
        self.stats["capture"] += 1
        shapes = [tuple(x.shape) for x in leaves if isinstance(x, torch.Tensor)]
        logger.info(
            "fpq: CUDA graphs: captured the forward for inputs %s in %.2f s (%d kept)",
            shapes[:2],
            time.perf_counter() - start,
            len(self._graphs),
        )
        return entry

    @staticmethod
    def _buffer(x: torch.Tensor, device: torch.device) -> torch.Tensor:
        buf = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
        return buf.copy_(x)


def _capture_launches():
    """fpq's cached kernel launches with plain-int pointers (fpq_plugin.kernels.qops.pointer_args_as_ints) under the
    cudaMallocAsync allocator, where Triton's pointer check fails inside a capture; else nothing changes."""
    if not async_allocator_active():
        return contextlib.nullcontext()
    from fpq_plugin.kernels.qops import pointer_args_as_ints

    return pointer_args_as_ints()


def _binder_launches():
    """Counts Triton binder launches (fpq_plugin.kernels.qops.count_triton_binder_launches)."""
    from fpq_plugin.kernels.qops import count_triton_binder_launches

    return count_triton_binder_launches()


def enable_cuda_graphs(module: torch.nn.Module, **options: Any) -> GraphedForward:
    """Make ``module(...)`` replay CUDA graphs (see :class:`GraphedForward` for ``options``); returns the wrapper.

    Calling it again returns the installed wrapper. CPU calls, and every case the module docstring lists, run the
    original forward, so enabling is safe anywhere; :func:`disable_cuda_graphs` undoes it and frees the graphs.
    """
    current = module.__dict__.get("forward")
    if isinstance(current, GraphedForward):
        return current
    graphed = GraphedForward(module, module.forward, **options)
    module.forward = graphed  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    return graphed


def disable_cuda_graphs(module: torch.nn.Module) -> bool:
    """Remove the wrapper and free its graphs; False if none was installed."""
    current = module.__dict__.get("forward")
    if not isinstance(current, GraphedForward):
        return False
    current.release()
    del module.__dict__["forward"]
    return True


def graphed_forward(module: torch.nn.Module) -> GraphedForward | None:
    """The installed wrapper, if any (its ``stats`` count replays, captures and eager calls)."""
    current = module.__dict__.get("forward")
    return current if isinstance(current, GraphedForward) else None
