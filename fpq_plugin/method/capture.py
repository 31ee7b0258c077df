"""Timestep-aware calibration capture: record the UNet's inputs while its own sampler runs.

The recorder wraps the UNet's forward with a pre-hook, so it does not care who drives the sampler: a diffusers
pipeline call, ComfyUI's KSampler, or a test loop all just call the UNet. Each call (latent, timestep, text
conditioning, extra conditioning such as SDXL's added embeddings; the conditional and unconditional halves of a
classifier-free-guidance batch together) is stored on the CPU as a :class:`UNetCall`. Which calls are kept is
decided by their position in the sampling loop, so the kept calls spread over the noise schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


@dataclass
class UNetCall:
    """One recorded UNet call: positional and keyword arguments, tensors on the CPU."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    step: int  # index of the call within its sampling run

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> UNetCall:
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return UNetCall(_map_tensors(self.args, move), _map_tensors(self.kwargs, move), self.step)

    def nbytes(self) -> int:
        total = 0

        def count(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        _map_tensors((self.args, self.kwargs), count)
        return total


def spread_steps(num_steps: int, keep: int) -> set[int]:
    """``keep`` call indices spread evenly over a sampling run of ``num_steps`` calls (first and last included)."""
    if keep >= num_steps:
        return set(range(num_steps))
    if keep == 1:
        return {num_steps // 2}
    return {round(i * (num_steps - 1) / (keep - 1)) for i in range(keep)}


@contextmanager
def record_unet_inputs(
    unet: nn.Module, *, steps_per_run: int | None = None, keep_steps: int | None = None, max_bytes: int = 2**31
) -> Iterator[list[UNetCall]]:
    """Record the inputs of every (or every chosen) UNet call made inside the ``with`` block.

    Args:
        unet: the module whose ``forward`` the sampler calls.
        steps_per_run: UNet calls per sampling run (the number of inference steps, or twice that for samplers that
            call the model twice per step); with ``keep_steps`` it selects the calls to keep.
        keep_steps: how many calls of each run to keep, spread over the schedule (None: keep all).
        max_bytes: stop recording once this much is held (memory stays bounded whatever the caller runs).

    Yields:
        The list that fills with :class:`UNetCall` objects. The hook is removed on exit, errors included.
    """
    calls: list[UNetCall] = []
    wanted = spread_steps(steps_per_run, keep_steps) if steps_per_run and keep_steps else None
    state = {"index": 0, "bytes": 0}

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        step = state["index"] % steps_per_run if steps_per_run else state["index"]
        state["index"] += 1
        if (wanted is not None and step not in wanted) or state["bytes"] >= max_bytes:
            return
        call = UNetCall(
            _map_tensors(args, lambda t: t.detach().cpu().clone()),
            _map_tensors(kwargs, lambda t: t.detach().cpu().clone()),
            step,
        )
        state["bytes"] += call.nbytes()
        calls.append(call)

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def capture_pipeline_inputs(
    pipe: Any,
    prompts: list[str],
    *,
    num_inference_steps: int = 20,
    keep_steps: int = 8,
    guidance_scale: float = 7.5,
    batch_size: int = 1,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> list[UNetCall]:
    """Run a diffusers text-to-image pipeline on ``prompts`` and keep ``keep_steps`` UNet calls per run.

    The full-precision pipeline generates as a user would (its own scheduler, classifier-free guidance), so the
    recorded latents are the ones the quantized UNet will meet.
    """
    calls: list[UNetCall] = []
    with record_unet_inputs(pipe.unet, steps_per_run=num_inference_steps, keep_steps=keep_steps) as recorded:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            generator = torch.Generator().manual_seed(seed + i)
            pipe(
                chunk,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="latent",
                height=height,
                width=width,
            )
        calls.extend(recorded)
    return calls
