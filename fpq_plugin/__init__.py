"""fpq: low-bit floating-point post-training quantization (FP8 / FP4) for Stable Diffusion UNets.

Public API::

    import fpq_plugin as fpq
    report = fpq.quantize_(unet, "w8a8", calibration_fn=run_a_few_steps)
    fpq.save_quantized(unet, "unet.fpq.safetensors", recipe="w8a8")
    unet, header = fpq.load_quantized("unet.fpq.safetensors")

Importing this package imports only torch: never diffusers, ComfyUI or triton, and it never initialises CUDA.
"""

from fpq_plugin import prompts
from fpq_plugin.api import (
    LayerPlan,
    QuantizationReport,
    quantize_,
    quantized_layers,
    set_backend,
    state_bytes,
)
from fpq_plugin.errors import (
    CancelledError,
    CheckpointError,
    FormatError,
    FPQError,
    LayerQuantizationError,
    RecipeError,
)
from fpq_plugin.formats import FORMATS, FPFormat, IntFormat, get_format
from fpq_plugin.io import load_quantized, read_header, save_quantized
from fpq_plugin.nn import QConv2d, QLinear, QuantizedLayer
from fpq_plugin.recipes import PRESETS, Recipe, get_recipe

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "PRESETS",
    "CancelledError",
    "CheckpointError",
    "FPFormat",
    "FPQError",
    "FormatError",
    "IntFormat",
    "LayerPlan",
    "LayerQuantizationError",
    "QConv2d",
    "QLinear",
    "QuantizationReport",
    "QuantizedLayer",
    "Recipe",
    "RecipeError",
    "__version__",
    "get_format",
    "get_recipe",
    "prompts",
    "load_quantized",
    "quantize_",
    "quantized_layers",
    "read_header",
    "save_quantized",
    "set_backend",
    "state_bytes",
]
