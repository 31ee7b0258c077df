"""Export an fpq MODEL as a ComfyUI-native ``comfy_quant`` UNet file that plain ComfyUI (>= 0.8) loads.

ComfyUI's mixed-precision checkpoints (its ``QUANTIZATION.md`` and ``comfy/quant_ops.py`` ``QUANT_ALGOS``) store,
for each quantized Linear ``<layer>``:

* ``<layer>.weight``: float8_e4m3fn or float8_e5m2, shape ``(out_features, in_features)``;
* ``<layer>.weight_scale``: float32 scalar (one scale per tensor: ``weight ~ weight.float() * weight_scale``);
* ``<layer>.input_scale``: optional float32 scalar, the static activation scale of FP8 matmuls;
* ``<layer>.comfy_quant``: uint8 tensor holding the JSON bytes ``{"format": "float8_e4m3fn"}``;

and every other tensor in plain floating point. The safetensors metadata also carries ``_quantization_metadata``
(``{"format_version": "1.0", "layers": {<layer>: {"format": ...}}}``), the documented form of the same map.

What this exporter writes from an fpq model:

* FP8 (e4m3fn / e5m2) Linear layers: natively. fpq's per-tensor-scaled codes are copied bit for bit; per-channel
  scaled layers (fpq's default) are requantized to one scale per tensor (round-to-nearest on fpq's dequantized
  weight), because ComfyUI's FP8 layout has a single scale: close to, not identical with, the fpq file.
  The activation scale is exported as ``input_scale`` when the layer's activation format is the same FP8 type.
* Everything else (Conv2d layers, FP4 / INT / other formats ComfyUI has no layout for, unquantized tensors):
  dequantized to fp16 (bf16 when the model computes in bf16), so the file loads anywhere; those layers lose fpq's
  memory saving in this file. The fpq file (format "fpq") keeps everything exactly.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from fpq_plugin.io.checkpoint import atomic_write_bytes
from fpq_plugin.nn import QuantizedLayer
from fpq_plugin.quantizers import quantize_weight

# fpq format name -> (ComfyUI quant format, torch storage dtype)
NATIVE_FP8 = {"e4m3fn": ("float8_e4m3fn", torch.float8_e4m3fn), "e5m2": ("float8_e5m2", torch.float8_e5m2)}


def _fp8_tensors(name: str, layer: QuantizedLayer, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(weight as fp8 (N, K), per-tensor scale (fp32 scalar), exact)`` for an FP8 fpq Linear."""
    codes, scale = layer.weight_codes, layer.weight_scale
    if scale.numel() == 1 and layer.weight_zero_point is None:
        # Same code bits: fpq's e4m3fn / e5m2 encodings are torch's float8 bit layouts.
        return codes.contiguous().view(storage), scale.reshape(()).float().clone(), True
    weight = layer.dequantized_weight(torch.float32).reshape(layer.out_features, -1)  # (N, K)
    q = quantize_weight(weight, layer.weight_format, granularity="tensor", scale_method="absmax", layer=name)
    return q.codes.contiguous().view(storage), q.scale.reshape(()).float().clone(), False


def comfy_quant_state_dict(
    diffusion_model: torch.nn.Module, float_dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, str]], dict[str, int]]:
    """The ``comfy_quant`` state dict of a diffusion model holding fpq layers (LDM key names, no prefix).

    Returns:
        ``(tensors, layers, counts)``: the tensors to write; ``{layer: {"format": ...}}`` of the natively stored
        layers; and counts (``native_exact``, ``native_requantized``, ``input_scales``, ``dequantized``).
    """
    quantized = {n: m for n, m in diffusion_model.named_modules() if isinstance(m, QuantizedLayer)}
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, str]] = {}
    counts = {"native_exact": 0, "native_requantized": 0, "input_scales": 0, "dequantized": 0}
    for key, value in diffusion_model.state_dict().items():
        if key.rsplit(".", 1)[0] in quantized:
            continue  # written below, per layer
        tensors[key] = value.detach().to(float_dtype) if value.is_floating_point() else value.detach()
    for name, layer in quantized.items():
        native = NATIVE_FP8.get(layer.weight_format.name) if layer.kind == "linear" else None
        if native is not None:
            quant_format, storage = native
            weight, scale, exact = _fp8_tensors(name, layer, storage)
            tensors[f"{name}.weight"] = weight
            tensors[f"{name}.weight_scale"] = scale
            conf = {"format": quant_format}
            tensors[f"{name}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
            layers[name] = conf
            counts["native_exact" if exact else "native_requantized"] += 1
            fmt = layer.input_format
            if fmt is not None and fmt.name == layer.weight_format.name and layer.input_zero_point is None:
                tensors[f"{name}.input_scale"] = layer.input_scale.reshape(()).float().clone()
                counts["input_scales"] += 1
        else:
            tensors[f"{name}.weight"] = (
                layer.dequantized_weight(torch.float32).reshape(layer.weight_shape).to(float_dtype)
            )
            counts["dequantized"] += 1
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().to(float_dtype)
    return {k: t.detach().cpu().contiguous() for k, t in tensors.items()}, layers, counts


def save_comfy_quant(
    diffusion_model: torch.nn.Module, path: str, *, float_dtype: torch.dtype, provenance: dict[str, Any]
) -> dict[str, int]:
    """Write ``diffusion_model`` (with fpq layers) to ``path`` as a ``comfy_quant`` UNet file, atomically.

    Args:
        diffusion_model: the UNet with fpq quantized layers.
        path: destination ``.safetensors``.
        float_dtype: dtype of every tensor that is not stored natively.
        provenance: JSON-able notes stored under the ``fpq_export`` metadata key (recipe, method...).

    Returns:
        The counts of :func:`comfy_quant_state_dict`.
    """
    from safetensors.torch import save_file

    tensors, layers, counts = comfy_quant_state_dict(diffusion_model, float_dtype)
    metadata = {
        "_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers}),
        "fpq_export": json.dumps({**provenance, "counts": counts}, sort_keys=True),
    }
    atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return counts
