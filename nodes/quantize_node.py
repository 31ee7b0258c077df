"""The "FP Quantize UNet" node: MODEL in, FP8/FP4-quantized MODEL out; the input MODEL is never modified."""

from __future__ import annotations

import logging
import time
from typing import Any

from fpq_plugin.api import quantize_
from fpq_plugin.fingerprint import fingerprint_module
from fpq_plugin.prompts import load_prompts, prompt_set_id
from fpq_plugin.recipes import get_recipe

from .comfy_integration import (
    NodeInputError,
    NodeProgress,
    calibrate_input_ranges,
    check_float_model,
    format_counts,
    quant_cache,
    quantizable_layers,
    quantized_copy,
)

logger = logging.getLogger("fpq")

RECIPES = ("w8a8", "w4a8", "w4a16", "w8a16")

# Calibration budget per quality preset: prompts from fpq's default set, sampler steps per prompt. Every preset
# rounds to nearest for now; the learned-rounding method (fpq_plugin.method, same call shape as quantize_) will be
# picked here per preset when it lands.
QUALITY_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"prompts": 4, "steps": 4, "quantize_fn": quantize_},
    "standard": {"prompts": 8, "steps": 8, "quantize_fn": quantize_},
    "best": {"prompts": 16, "steps": 16, "quantize_fn": quantize_},
}


# How calibration samples (part of the cache key). Bump METHOD_VERSION when calibration changes its results.
CALIBRATION_SAMPLER: dict[str, Any] = {"cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"}
METHOD_VERSION = "comfyui-calib-1"


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
                        "w4a16 / w8a16: weights only (no calibration, no CLIP needed).",
                    },
                ),
                "quality": (
                    list(QUALITY_PRESETS),
                    {"default": "standard", "tooltip": "How much calibration runs (prompts x sampler steps)."},
                ),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Encodes the calibration prompts; needed by w8a8 and w4a8."}),
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
    ) -> tuple[Any]:
        if recipe not in RECIPES:
            raise NodeInputError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        if quality not in QUALITY_PRESETS:
            raise NodeInputError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITY_PRESETS)}")
        preset = QUALITY_PRESETS[quality]
        rec = get_recipe(recipe)
        check_float_model(model)
        if rec.quantizes_activations and clip is None:
            raise NodeInputError(
                f"recipe {recipe} quantizes activations, so it calibrates on prompts: connect a CLIP to the 'clip' "
                "input (the one you use for this model), or choose a weight-only recipe (w8a16, w4a16)"
            )
        layer_names = quantizable_layers(model, rec)
        calibrating = rec.quantizes_activations
        prompts = load_prompts(limit=preset["prompts"]) if calibrating else []
        progress = NodeProgress(len(prompts) * preset["steps"], len(layer_names))
        timings = {"calibration": 0.0}

        def calibrate() -> dict[str, list[float]]:
            start = time.perf_counter()
            ranges = calibrate_input_ranges(
                model, clip, prompts, layer_names,
                steps=preset["steps"], resolution=calibration_resolution, seed=seed, on_step=progress.step,
                **CALIBRATION_SAMPLER,
            )  # fmt: skip
            timings["calibration"] = time.perf_counter() - start
            return ranges

        key_parts = {
            "prompt_set": prompt_set_id(prompts) if calibrating else None,
            "method_version": METHOD_VERSION,
            "extra": {"front_door": "comfyui", "quality": quality},
        }
        if calibrating:
            key_parts["extra"].update(
                steps=preset["steps"], resolution=calibration_resolution, seed=seed, **CALIBRATION_SAMPLER,
                clip=fingerprint_module(clip.cond_stage_model),
            )  # fmt: skip
        start = time.perf_counter()
        quantized, hit = quantized_copy(
            model, rec, layer_names,
            calibrate=calibrate if calibrating else None, quantize_fn=preset["quantize_fn"], progress=progress.layer,
            cache=quant_cache(), cache_key_parts=key_parts,
        )  # fmt: skip
        progress.finish()
        logger.info(
            "fpq: %s (%s): %d layers (%s) %s, model %s -> %s, calibration %.1f s, total %.1f s",
            rec.name,
            quality,
            len(layer_names),
            ", ".join(f"{n} {f}" for f, n in sorted(format_counts(quantized).items())),
            "loaded from the fpq cache" if hit else "quantized",
            _mib(model.model_size()),
            _mib(quantized.model_size()),
            timings["calibration"],
            time.perf_counter() - start,
        )
        return (quantized,)
