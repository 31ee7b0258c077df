"""Calibration inside the graph: record the UNet's inputs while ComfyUI's own sampler runs, then run fpq's method.

Imported only inside ComfyUI. The numerics live in :mod:`fpq_plugin.method`; this module drives ComfyUI's sampler
(``comfy.sample.sample``, the function KSampler uses) and adapts device placement, inference mode, progress and
cancellation to ComfyUI.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import comfy.model_management as mm
import comfy.sample
import torch

from fpq_plugin.method import MethodConfig, MethodReport, UNetCall, quantize_with_method, record_unet_inputs
from fpq_plugin.recipes import Recipe

logger = logging.getLogger("fpq")

DIFFUSION_PREFIX = "diffusion_model."


def encode_prompt(clip: Any, text: str) -> list:
    """CONDITIONING for ``text``, exactly as the CLIPTextEncode node makes it."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def record_sampler_calls(
    patcher: Any,
    clip: Any,
    prompts: list[str],
    *,
    steps: int,
    keep_steps: int,
    resolution: int,
    seed: int = 0,
    cfg: float = 7.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    on_step: Callable[[], None] | None = None,
) -> list[UNetCall]:
    """Sample every prompt with ComfyUI's sampler on the input MODEL and record the diffusion model's inputs.

    The recorder is a forward pre-hook on the diffusion model the input MODEL runs (``get_model_object`` resolves its
    object patches; its weight patches, e.g. a LoRA before this node, are active), so the recorded calls are exactly
    what that model receives under KSampler: latents along the schedule, timesteps, text conditioning with the
    conditional and unconditional halves batched, and ComfyUI's ``transformer_options``. ``keep_steps`` calls of
    each run are kept, spread over the schedule (first and last step included). The hook is removed on exit, also
    when the user cancels.

    Returns:
        The recorded calls, tensors on the CPU.
    """
    model = patcher.clone()
    diffusion_model = model.get_model_object("diffusion_model")
    negative = encode_prompt(clip, "")
    callback = (lambda step, x0, x, total: on_step()) if on_step is not None else None
    calls: list[UNetCall] = []
    for i, prompt in enumerate(prompts):
        mm.throw_exception_if_processing_interrupted()
        positive = encode_prompt(clip, prompt)
        latent = torch.zeros([1, 4, resolution // 8, resolution // 8])
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed + i)
        # One recorder per run: the kept steps are counted from the start of each run.
        with record_unet_inputs(diffusion_model, steps_per_run=steps, keep_steps=keep_steps) as recorded:
            comfy.sample.sample(
                model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                denoise=1.0, callback=callback, disable_pbar=True, seed=seed + i,
            )  # fmt: skip
        calls.extend(recorded)
    return calls


def _own_tensors(module: torch.nn.Module) -> None:
    """Give ``module`` parameter objects of its own, usable by autograd.

    The float snapshot shares the layers to be quantized with the input MODEL (same Parameter objects), and
    ComfyUI loads weights inside ``torch.inference_mode``, which makes them inference tensors that autograd refuses
    to save. Learned rounding needs gradients, and moving the snapshot to the GPU must not move the input's
    Parameters (``Module.to`` assigns ``param.data`` in place). So every Parameter is replaced by a new one:
    inference tensors are cloned, others share storage (nothing here writes into weights).
    """
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            # .data, not .detach(): a Parameter made in inference mode and moved outside it has no version counter
            data = p.detach().clone() if p.is_inference() else p.data
            sub._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


@contextlib.contextmanager
def on_compute_device(diffusion_model: torch.nn.Module, load_device: Any, offload_device: Any) -> Iterator[None]:
    """Run the body with the float snapshot ``diffusion_model`` on ComfyUI's compute device (the GPU when there is
    one; other models are unloaded first to make room) and with autograd available (ComfyUI executes nodes in
    inference mode); the snapshot ends on ``offload_device``, also when the body raises (a cancel, say)."""
    moved = torch.device(load_device) != torch.device(offload_device)
    if moved:
        # Make room: the method holds the model, a float copy and unit activations. This stays inside ComfyUI's
        # inference mode: a Parameter made in inference mode and moved outside it keeps no version counter, and the
        # next view of it fails ("Inference tensors do not track version counter"), in fpq or in any other node.
        mm.unload_all_models()
        mm.soft_empty_cache()
    with torch.inference_mode(False):
        _own_tensors(diffusion_model)
        if moved:
            diffusion_model.to(load_device)
        try:
            yield
        finally:
            if moved:
                diffusion_model.to(offload_device)
                mm.soft_empty_cache()


def run_method(
    diffusion_model: torch.nn.Module,
    recipe: Recipe,
    calls: list[UNetCall],
    config: MethodConfig,
    layer_names: list[str],
    *,
    load_device: torch.device,
    offload_device: torch.device,
    progress: Callable[[int, int, str], None] | None = None,
) -> MethodReport:
    """Quantize ``diffusion_model`` (the float snapshot) in place with :func:`fpq_plugin.method.quantize_with_method`,
    on ComfyUI's compute device (:func:`on_compute_device`). ``progress(done, total, unit)`` is called after every
    unit and every 50 rounding iterations; raising there cancels.
    """
    wanted = set(layer_names)
    with on_compute_device(diffusion_model, load_device, offload_device):
        return quantize_with_method(
            diffusion_model, recipe, calls, method=config, layer_filter=lambda n, _m: n in wanted, progress=progress
        )


def method_summary(report: MethodReport, calls: list[UNetCall], calibration_s: float) -> dict[str, Any]:
    """What the method did, JSON-able: stored in the cache entry's header and in saved files."""
    learned = [u for u in report.units if u.get("kept") == "learned"]
    rounded = [u for u in report.units if "nearest" in u]
    return {
        "preset": report.config.name,
        "rounding": report.recipe.rounding,
        "rounding_iters": report.config.rounding_iters,
        "calls": len(calls),
        "units": len(report.units),
        "units_learned": len(learned),
        # Sum over units of the unit-output MSE vs full precision, rounding to nearest vs the rounding kept.
        "unit_error_nearest": sum(float(u["nearest"]) for u in rounded),
        "unit_error_kept": sum(float(min(u["nearest"], u["learned"])) for u in rounded),
        "formats": report.format_counts(),
        "calibration_s": round(calibration_s, 3),
        "method_s": round(report.seconds, 3),
        "phases_s": {k: round(v, 3) for k, v in report.phases.items()},
    }


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    start = time.perf_counter()
    return fn(), time.perf_counter() - start
