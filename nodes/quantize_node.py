"""The "FP Quantize UNet" node: MODEL in, FP8/FP4-quantized MODEL out; the input MODEL is never modified."""

from __future__ import annotations

import logging
import time
from typing import Any

from fpq_plugin.api import quantize_
from fpq_plugin.fingerprint import fingerprint_module
from fpq_plugin.method import METHOD_VERSION as FPQ_METHOD_VERSION
from fpq_plugin.method import get_method_config, recipe_for
from fpq_plugin.prompts import load_prompts, prompt_set_id
from fpq_plugin.recipes import get_recipe

from .calibration import method_summary, on_compute_device, record_sampler_calls, run_method, timed
from .comfy_integration import (
    CUDA_GRAPHS_TOOLTIP,
    NodeInputError,
    NodeProgress,
    check_float_model,
    format_counts,
    quant_cache,
    quantizable_layers,
    quantized_copy,
    set_cuda_graphs,
)

logger = logging.getLogger("fpq")

RECIPES = ("w8a8", "w4a8", "w4a16", "w8a16")

# Quality presets: fpq's method preset (fast: format/scale search with round-to-nearest; standard / best: search
# plus learned rounding, block by block), and the calibration it runs on: prompts from fpq's default set, sampler
# steps per prompt, and how many of each run's UNet calls are kept (spread over the schedule).
QUALITY_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"method": "fast", "prompts": 4, "steps": 4, "keep_steps": 4},
    "standard": {"method": "standard", "prompts": 8, "steps": 8, "keep_steps": 4},
    "best": {"method": "best", "prompts": 16, "steps": 16, "keep_steps": 8},
}

# How calibration samples (part of the cache key). Bump METHOD_VERSION when the node's calibration or its use of
# the method changes results; fpq_plugin.method's own version is part of the key too.
CALIBRATION_SAMPLER: dict[str, Any] = {"cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"}
METHOD_VERSION = "comfyui-method-2"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class FPQuantizeUNet:
    """Quantize a MODEL's diffusion model to FP8 / FP4 with fpq (calibrated inside the graph when needed)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The full-precision model to quantize (it is not modified)."}),
                "recipe": (
                    list(RECIPES),
                    {
                        "default": "w8a8",
                        "tooltip": "w8a8: FP8 weights and activations. w4a8: FP4 weights, FP8 activations. "
                        "w4a16 / w8a16: weights only (with quality 'fast' they need no CLIP and no calibration).",
                    },
                ),
                "quality": (
                    list(QUALITY_PRESETS),
                    {
                        "default": "standard",
                        "tooltip": "fast: format and scale search, round-to-nearest (4 prompts x 4 steps). "
                        "standard: plus learned rounding, block by block (8 prompts x 8 steps). best: longer learned "
                        "rounding on more calibration (16 prompts x 16 steps). Runs once per model: the result is "
                        "cached in models/fpq_cache.",
                    },
                ),
            },
            "optional": {
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "Encodes the calibration prompts; needed by w8a8 and w4a8 and by quality standard/best."
                    },
                ),
                "calibration_resolution": (
                    "INT",
                    {
                        "default": 512,
                        "min": 64,
                        "max": 4096,
                        "step": 64,
                        "tooltip": "Image size of the calibration runs: the model's native size (512 for SD1.5, "
                        "1024 for SDXL).",
                    },
                ),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Noise seed of calibration."}),
                "cuda_graphs": ("BOOLEAN", {"default": True, "tooltip": CUDA_GRAPHS_TOOLTIP}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The quantized model (a separate copy).",)
    FUNCTION = "quantize"
    CATEGORY = "fpq"
    DESCRIPTION = "Quantize the diffusion model to FP8 / FP4 (W8A8, W4A8, W4A16, W8A16) with fpq."

    def quantize(
        self,
        model: Any,
        recipe: str,
        quality: str,
        clip: Any = None,
        calibration_resolution: int = 512,
        seed: int = 0,
        cuda_graphs: bool = True,
    ) -> tuple[Any]:
        if recipe not in RECIPES:
            raise NodeInputError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        if quality not in QUALITY_PRESETS:
            raise NodeInputError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITY_PRESETS)}")
        preset = QUALITY_PRESETS[quality]
        rec = get_recipe(recipe)
        check_float_model(model)
        if clip is None and rec.quantizes_activations:
            raise NodeInputError(
                f"recipe {recipe} quantizes activations, so it calibrates on prompts: connect a CLIP to the 'clip' "
                "input (the one you use for this model), or choose a weight-only recipe (w8a16, w4a16)"
            )
        if clip is None and quality != "fast":
            raise NodeInputError(
                f"quality '{quality}' learns the weight rounding on calibration prompts: connect a CLIP to the 'clip' "
                "input (the one you use for this model), or choose quality 'fast' (round-to-nearest, no calibration)"
            )
        layer_names = quantizable_layers(model, rec)
        calibrating = clip is not None
        config = get_method_config(preset["method"])
        if calibrating:
            method_recipe = recipe_for(rec, config)
            prompts = load_prompts(limit=preset["prompts"])
            progress = NodeProgress(len(prompts) * preset["steps"], len(layer_names))
            quantize = self._method_quantizer(
                model, clip, prompts, preset, config, method_recipe, layer_names, calibration_resolution, seed,
                progress,
            )  # fmt: skip
            key_parts = {
                "prompt_set": prompt_set_id(prompts),
                "method_version": f"{METHOD_VERSION}+method-{FPQ_METHOD_VERSION}",
                "extra": {
                    "front_door": "comfyui", "quality": quality, "method": config.name, "steps": preset["steps"],
                    "keep_steps": preset["keep_steps"], "resolution": calibration_resolution, "seed": seed,
                    **CALIBRATION_SAMPLER, "clip": fingerprint_module(clip.cond_stage_model),
                },
            }  # fmt: skip
        else:  # weight-only, quality fast, no CLIP: data-free round-to-nearest
            method_recipe = rec
            progress = NodeProgress(0, len(layer_names))
            quantize = self._data_free_quantizer(rec, progress, model.load_device, model.offload_device)
            key_parts = {
                "prompt_set": None,
                "method_version": f"{METHOD_VERSION}+data-free",
                "extra": {"front_door": "comfyui", "quality": quality, "method": "data-free-nearest"},
            }
        start = time.perf_counter()
        quantized, hit = quantized_copy(
            model, method_recipe, layer_names, quantize=quantize, cache=quant_cache(), cache_key_parts=key_parts
        )
        progress.finish()
        set_cuda_graphs(quantized.model, cuda_graphs)
        info = quantized.model.fpq_method or {}
        logger.info(
            "fpq: %s (%s): %d layers (%s) %s, model %s -> %s, calibration %.1f s, total %.1f s; method %s, %d/%d "
            "units learned their rounding",
            rec.name,
            quality,
            len(layer_names),
            ", ".join(f"{n} {f}" for f, n in sorted(format_counts(quantized).items())),
            "loaded from the fpq cache" if hit else "quantized",
            _mib(model.model_size()),
            _mib(quantized.model_size()),
            0.0 if hit else info.get("calibration_s", 0.0),
            time.perf_counter() - start,
            info.get("preset", "?"),
            info.get("units_learned", 0),
            info.get("units", 0),
        )
        return (quantized,)

    @staticmethod
    def _method_quantizer(model, clip, prompts, preset, config, recipe, layer_names, resolution, seed, progress):
        """``quantize(diffusion_model, layer_names)``: record ComfyUI's sampler on the prompts, run the method."""

        def quantize(diffusion_model: Any, names: list[str]) -> dict[str, Any]:
            calls, calibration_s = timed(
                lambda: record_sampler_calls(
                    model, clip, prompts, steps=preset["steps"], keep_steps=preset["keep_steps"],
                    resolution=resolution, seed=seed, on_step=progress.step, **CALIBRATION_SAMPLER,
                )
            )  # fmt: skip
            logger.info(
                "fpq: calibration sampling recorded %d UNet calls in %.1f s; running the %s method on %d layers",
                len(calls), calibration_s, config.name, len(names),
            )  # fmt: skip
            report = run_method(
                diffusion_model, recipe, calls, config, names, load_device=model.load_device,
                offload_device=model.offload_device, progress=progress.quantize,
            )  # fmt: skip
            return {"calibration": preset, **method_summary(report, calls, calibration_s)}

        return quantize

    @staticmethod
    def _data_free_quantizer(recipe, progress, load_device, offload_device):
        """``quantize(diffusion_model, layer_names)``: round-to-nearest with the recipe's weight scales, no data, on
        ComfyUI's compute device (the 4-bit scale search took 188 s for the test UNet on one CPU thread)."""

        def quantize(diffusion_model: Any, names: list[str]) -> dict[str, Any]:
            wanted = set(names)

            def run() -> Any:
                with on_compute_device(diffusion_model, load_device, offload_device):
                    return quantize_(
                        diffusion_model, recipe, layer_filter=lambda n, _m: n in wanted, progress=progress.quantize
                    )

            report, seconds = timed(run)
            return {"preset": "data-free-nearest", "rounding": "nearest", "calls": 0, "units": 0,
                    "units_learned": 0, "calibration_s": 0.0, "method_s": round(seconds, 3)}  # fmt: skip

        return quantize
