"""``FPQuantPipeline.from_pretrained``: a diffusers text-to-image pipeline with an FP8/FP4 UNet, cached per model.

First use of a model + recipe: the full-precision pipeline generates on calibration prompts while its UNet inputs
are recorded, the paper's method quantizes the UNet, and the result goes to the cache (keyed by a content hash of
the UNet weights, the recipe, the prompt set and the method). Later loads restore the quantized UNet from the cache
with no calibration. ``save_quantized_pipeline`` writes a folder others can load with no calibration and without
the original UNet weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fpq_plugin.cache import QuantCache, cache_key
from fpq_plugin.errors import CheckpointError
from fpq_plugin.fingerprint import fingerprint_module
from fpq_plugin.io import load_quantized, save_quantized
from fpq_plugin.method import METHOD_VERSION, MethodConfig, capture_pipeline_inputs, quantize_with_method, recipe_for
from fpq_plugin.method.config import get_method_config
from fpq_plugin.prompts import load_prompts, prompt_set_id
from fpq_plugin.recipes import Recipe, get_recipe

logger = logging.getLogger(__name__)

QUANTIZED_UNET_FILE = "fpq_unet.safetensors"  # inside the pipeline folder's unet/ subfolder


def _load_float_pipeline(path: str | os.PathLike, **kwargs: Any):
    from diffusers import DiffusionPipeline

    path = Path(path)
    if path.is_file():
        return DiffusionPipeline.from_single_file(str(path), **kwargs)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such pipeline folder or checkpoint file")
    return DiffusionPipeline.from_pretrained(str(path), **kwargs)


class FPQuantPipeline:
    """Namespace for the loader; the object returned is the diffusers pipeline itself, with a quantized UNet."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        recipe: str | Recipe = "w8a8",
        *,
        method: str | MethodConfig = "standard",
        prompts: Sequence[str] | str | os.PathLike | None = None,
        num_prompts: int = 16,
        num_inference_steps: int = 20,
        keep_steps: int = 8,
        calibration_size: tuple[int, int] | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        device: str | torch.device | None = None,
        **pipeline_kwargs: Any,
    ):
        """Load a pipeline and quantize its UNet (from the cache when possible).

        Args:
            path: a diffusers pipeline folder (SD1.x, SD2.x, SDXL), a folder written by
                :func:`save_quantized_pipeline` (loads with no calibration), or a single-file checkpoint.
            recipe: ``"w8a8"``, ``"w4a8"``, ``"w4a16"``, ``"w8a16"``, ``"int8"``, ``"int4"``, a YAML path or a Recipe.
            method: ``"fast"``, ``"standard"`` or ``"best"`` (or a MethodConfig).
            prompts: calibration prompts (list or file); default: the bundled set.
            num_prompts: how many prompts calibrate (spread over the set).
            num_inference_steps, keep_steps: calibration sampling steps, and how many of each run are recorded.
            calibration_size: ``(height, width)`` of calibration images; default: the pipeline's default.
            cache_dir: cache folder (default: ``FPQ_CACHE_DIR`` or the user cache directory).
            use_cache: False always calibrates and never writes the cache.
            device: where calibration runs (default: CUDA if available, else CPU).
            pipeline_kwargs: passed to diffusers' ``from_pretrained`` (e.g. ``torch_dtype``).

        Returns:
            The diffusers pipeline with its UNet quantized; ``pipe.fpq_info`` says what happened.
        """
        path = Path(path)
        quantized_file = path / "unet" / QUANTIZED_UNET_FILE
        if quantized_file.is_file():
            return load_quantized_pipeline(path, device=device, **pipeline_kwargs)
        recipe = get_recipe(recipe)
        config = get_method_config(method)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pipe = _load_float_pipeline(path, **pipeline_kwargs).to(device)
        fingerprint = fingerprint_module(pipe.unet)
        prompt_list = load_prompts(prompts, limit=num_prompts) if recipe.quantizes_activations or (
            config.rounding_iters > 0) else []
        height, width = calibration_size or (None, None)
        settings = {"method": config.name, "steps": num_inference_steps, "keep": keep_steps, "size": [height, width]}
        key = cache_key(fingerprint, recipe_for(recipe, config), prompt_set_id(prompt_list) if prompt_list else None,
                        method_version=METHOD_VERSION, extra=settings)

        def build():
            calls = []
            if prompt_list:
                calls = capture_pipeline_inputs(pipe, prompt_list, num_inference_steps=num_inference_steps,
                                                keep_steps=keep_steps, height=height, width=width)
            else:  # weight-only and no learning: one recorded call drives the (data-free) search
                calls = capture_pipeline_inputs(pipe, ["a photo"], num_inference_steps=2, keep_steps=1)
            quantize_with_method(pipe.unet, recipe_for(recipe, config), calls, method=config)
            return pipe.unet

        if use_cache:
            cache = QuantCache(cache_dir)
            unet, header, hit = cache.get_or_build(key, build, pipe.unet, recipe=recipe_for(recipe, config),
                                                   model_fingerprint=fingerprint, extra=settings, device=device)
        else:
            unet, hit = build(), False
        pipe.unet = unet.to(device)
        pipe.fpq_info = {"cache_key": key, "cache_hit": hit, "fingerprint": fingerprint, "recipe": recipe.name,
                         "method": config.name}
        logger.info("fpq: %s UNet %s (cache %s)", recipe.name, "restored" if hit else "calibrated", key)
        return pipe


def save_quantized_pipeline(pipe: Any, path: str | os.PathLike, *, recipe: str | Recipe | None = None) -> Path:
    """Write the pipeline with its quantized UNet to ``path``; :meth:`FPQuantPipeline.from_pretrained` reloads it.

    The non-UNet parts are saved by diffusers as usual; the UNet folder holds its ``config.json`` and the fpq
    checkpoint (no full-precision UNet weights).
    """
    path = Path(path)
    unet = pipe.unet
    info = getattr(pipe, "fpq_info", {})
    recipe = recipe or info.get("recipe")
    if recipe is None:
        raise CheckpointError(f"{path}: say which recipe made this UNet: save_quantized_pipeline(..., recipe='w8a8')")
    # Save everything but the UNet through diffusers, then the UNet through fpq.
    pipe.register_modules(unet=None)
    try:
        pipe.save_pretrained(str(path))
    finally:
        pipe.register_modules(unet=unet)
    (path / "unet").mkdir(parents=True, exist_ok=True)
    unet.save_config(str(path / "unet"))
    save_quantized(unet, path / "unet" / QUANTIZED_UNET_FILE, recipe=recipe,
                   model_fingerprint=info.get("fingerprint"))
    return path


def load_quantized_pipeline(path: str | os.PathLike, *, device: str | torch.device | None = None, **kwargs: Any):
    """Load a folder written by :func:`save_quantized_pipeline` (no calibration, no float UNet weights)."""
    from diffusers import DiffusionPipeline

    path = Path(path)
    unet, header = load_quantized(path / "unet" / QUANTIZED_UNET_FILE)
    pipe = DiffusionPipeline.from_pretrained(str(path), unet=unet, **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    pipe.fpq_info = {"cache_key": None, "cache_hit": False, "fingerprint": header.model_fingerprint,
                     "recipe": header.recipe.name, "method": None, "loaded_from": str(path)}
    return pipe
