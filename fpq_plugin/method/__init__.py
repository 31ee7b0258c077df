"""The paper's method: timestep-aware calibration, per-tensor encoding/bias search and FP learned rounding.

Typical use with a diffusers pipeline::

    from fpq_plugin.method import capture_pipeline_inputs, quantize_with_method, recipe_for
    calls = capture_pipeline_inputs(pipe, prompts, num_inference_steps=20, keep_steps=8)
    report = quantize_with_method(pipe.unet, recipe_for("w4a8", "standard"), calls, method="standard")
"""

from __future__ import annotations

from fpq_plugin.method.capture import UNetCall, capture_pipeline_inputs, record_unet_inputs, spread_steps
from fpq_plugin.method.config import METHOD_PRESETS, METHOD_VERSION, MethodConfig, get_method_config
from fpq_plugin.method.run import MethodReport, quantize_with_method
from fpq_plugin.recipes import Recipe, get_recipe


def recipe_for(recipe: str | Recipe, method: str | MethodConfig) -> Recipe:
    """The recipe with ``rounding`` set as the method preset implies (``fast``: nearest, else learned)."""
    config = get_method_config(method)
    rounding = "learned" if config.rounding_iters > 0 else "nearest"
    return get_recipe(recipe).replace(rounding=rounding)


__all__ = [
    "METHOD_PRESETS",
    "METHOD_VERSION",
    "MethodConfig",
    "MethodReport",
    "UNetCall",
    "capture_pipeline_inputs",
    "get_method_config",
    "quantize_with_method",
    "recipe_for",
    "record_unet_inputs",
    "spread_steps",
]
