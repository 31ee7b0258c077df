"""Glue between fpq's quantized layers and ComfyUI's model management (imported only inside ComfyUI).

What ComfyUI expects from a layer, and how fpq's layers meet it:

* **Devices.** ComfyUI moves whole modules with ``.to()`` and may leave some on the CPU (lowvram), flagging them
  ``comfy_cast_weights``. fpq layers keep everything in registered buffers, so ``.to()`` and ComfyUI's size
  accounting (``module_size`` sums the state dict) see them; when a layer's buffers are not on the input's device,
  :class:`ComfyLayerMixin` runs it on a moved copy of its buffers instead of failing.
* **LoRA and other weight patches** are keyed ``diffusion_model.<layer>.weight``. ComfyUI reads the layer's
  ``weight`` (fpq layers return the dequantized weight), adds the patch in float, hands the result to
  ``set_weight(...)``, and later restores its backup with ``setattr(layer, "weight", ...)``. The mixin requantizes
  in ``set_weight`` (round-to-nearest, same format, fresh absmax scales) and restores the exact original codes on
  restore. :class:`FPQModelPatcher` accepts patches for these keys (the state dict holds ``weight_codes``, not
  ``weight``) and applies them when the model loads (ComfyUI only patches tensors that are parameters). A layer
  that lowvram leaves offloaded gets the patch per forward (``weight_function``), requantized the same way.
* **Never mutate the input MODEL.** :func:`quantized_copy` builds a separate model: a deep copy of the input's
  model (object patches and LoRA-style weight patches of the input baked in) in which only the layers to be
  quantized share their float weights with the original until they are replaced, wrapped in a new patcher.
"""

from __future__ import annotations

import copy
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import comfy.lora
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import torch

from fpq_plugin.api import iter_quantizable
from fpq_plugin.errors import FPQError
from fpq_plugin.integrations.comfyui_graphs import comfyui_unet_check
from fpq_plugin.integrations.cuda_graphs import disable_cuda_graphs, enable_cuda_graphs
from fpq_plugin.io import load_quantized, read_header, save_quantized
from fpq_plugin.nn import LAYER_KINDS, QConv2d, QLinear, QuantizedLayer
from fpq_plugin.quantizers import QuantizedWeight, quantize_weight
from fpq_plugin.recipes import Recipe

logger = logging.getLogger("fpq")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DIFFUSION_PREFIX = "diffusion_model."
_ORIGINAL = "_fpq_original_state"  # instance-dict key of the codes a weight patch replaced
_run_every_op = getattr(comfy.ops, "run_every_op", None)  # absent from older ComfyUI versions


class NodeInputError(FPQError, ValueError):
    """A node input that cannot be used; the message says what to connect instead."""


# ---- layers ---------------------------------------------------------------------------------------------------------
def requantize(layer: QuantizedLayer, weight: torch.Tensor) -> QuantizedWeight:
    """Round-to-nearest codes for a float ``weight`` in ``layer``'s format and granularity (absmax scales)."""
    return quantize_weight(
        weight.detach().reshape(layer.out_features, -1).float(),
        layer.weight_format,
        granularity="channel" if layer.per_channel else "tensor",
        scale_method="absmax",
        layer=type(layer).__name__,
    )


def _patched_weight(layer: QuantizedLayer, functions: list, device: torch.device) -> torch.Tensor:
    """The float weight of an offloaded layer with its per-forward patches applied, computed the way
    ``ModelPatcher.patch_weight_to_device`` computes it for a loaded layer (the weight in ComfyUI's LoRA compute
    dtype, fp16 on most GPUs; LoRA products in fp32), so that a LoRA gives the same requantized codes whether lowvram
    offloads the layer or not. (Patching an fp32 dequantized weight instead moved the test UNet's output by 2.9% on an
    H200 against the loaded path's fp16 arithmetic: enough codes land on the other side of a rounding boundary.)"""
    lora_dtype = getattr(mm, "lora_compute_dtype", lambda _device: torch.float32)(device)
    weight = layer.weight.to(lora_dtype)  # what ComfyUI reads from a loaded layer: the weight in the bias's dtype
    for f in functions:
        if isinstance(f, comfy.model_patcher.LowVramPatch):
            weight = comfy.lora.calculate_weight(f.patches[f.key], weight, f.key)
        else:
            weight = f(weight)
    return weight


class ComfyLayerMixin(comfy.ops.CastWeightBiasOp):
    """ComfyUI's layer protocol on top of an fpq quantized layer (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _run_every_op is not None:
            _run_every_op()  # ComfyUI's cancel check, as in its own ops
        if self.weight_function or self.bias_function or self.weight_codes.device != x.device:
            return self._forward_moved(x)
        return super().forward(x)

    def _forward_moved(self, x: torch.Tensor) -> torch.Tensor:
        # A shallow copy whose tensors live on x's device; the layer itself stays where ComfyUI put it.
        view = copy.copy(self)
        view.__dict__["_buffers"] = {k: None if t is None else t.to(x.device) for k, t in self._buffers.items()}
        view.__dict__["_parameters"] = {k: None if t is None else t.to(x.device) for k, t in self._parameters.items()}
        if self.weight_function:  # lowvram LoRA: patch the float weight, requantize it, as a loaded layer would be
            QuantizedLayer.set_weight(view, requantize(view, _patched_weight(view, self.weight_function, x.device)))
        if self.bias_function and view.bias is not None:
            bias = view.bias
            for f in self.bias_function:
                bias = f(bias)
            view.__dict__["_parameters"]["bias"] = bias
        return QuantizedLayer.forward(view, x)

    # ComfyUI's weight-patch hooks (comfy.model_patcher.get_key_weight / patch_weight_to_device).
    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs: Any) -> torch.Tensor:
        """ComfyUI passes a copy of ``self.weight``, which is already the dequantized float weight."""
        return weight

    def set_weight(
        self,
        weight: torch.Tensor | QuantizedWeight,
        inplace_update: bool = False,
        seed: int | None = None,
        return_weight: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor | None:
        """fpq's ``set_weight(QuantizedWeight)``, or ComfyUI's: requantize a patched float weight."""
        if isinstance(weight, QuantizedWeight):
            return super().set_weight(weight)
        qweight = requantize(self, weight)
        if return_weight:
            return qweight.dequantize().reshape(self.weight_shape).to(weight.dtype)
        if _ORIGINAL not in self.__dict__:
            self.__dict__[_ORIGINAL] = (self.weight_codes, self.weight_scale, self.weight_zero_point)
        super().set_weight(qweight)
        return None

    def __setattr__(self, name: str, value: Any) -> None:
        # ComfyUI undoes a weight patch with setattr(layer, "weight", Parameter(backup)).
        if name == "weight":
            self._restore_weight(value)
        else:
            super().__setattr__(name, value)

    @torch.no_grad()
    def _restore_weight(self, value: torch.Tensor) -> None:
        original = self.__dict__.pop(_ORIGINAL, None)
        if original is None:  # a float weight from elsewhere: quantize it
            super().set_weight(requantize(self, value))
            return
        device = self.weight_codes.device
        codes, scale, zero_point = original
        self.weight_codes = codes.to(device)
        self.weight_scale = scale.to(device)
        if zero_point is not None:
            self.weight_zero_point = zero_point.to(device)


class ComfyQLinear(ComfyLayerMixin, QLinear):
    """:class:`~fpq_plugin.nn.QLinear` that lives in ComfyUI's model management."""


class ComfyQConv2d(ComfyLayerMixin, QConv2d):
    """:class:`~fpq_plugin.nn.QConv2d` that lives in ComfyUI's model management."""


COMFY_TYPES: dict[type[QuantizedLayer], type[QuantizedLayer]] = {QLinear: ComfyQLinear, QConv2d: ComfyQConv2d}


def adopt_layers(diffusion_model: torch.nn.Module) -> list[str]:
    """Give every quantized layer its ComfyUI-aware class (same state, extra behaviour); returns their names."""
    names = []
    for name, module in diffusion_model.named_modules():
        if isinstance(module, QuantizedLayer):
            base = LAYER_KINDS[module.kind]
            module.__class__ = COMFY_TYPES[base]
            names.append(name)
    return names


# ---- the model patcher ----------------------------------------------------------------------------------------------
class FPQModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher for a model with fpq layers: weight patches (LoRA) reach the quantized layers.

    ``model.fpq_weight_keys`` lists ``diffusion_model.<layer>.weight`` of every quantized layer.
    """

    def _quantized_keys(self) -> frozenset[str]:
        return getattr(self.model, "fpq_weight_keys", frozenset())

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        # ComfyUI keeps only keys found in the model's state dict, where fpq layers have weight_codes, not weight.
        keys = self._quantized_keys()
        ours = {k: v for k, v in patches.items() if (k if isinstance(k, str) else k[0]) in keys}
        rest = {k: v for k, v in patches.items() if k not in ours}
        added = list(super().add_patches(rest, strength_patch, strength_model))
        for k, patch in ours.items():
            key, offset, function = (
                (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            )
            self.patches[key] = self.patches.get(key, []) + [(strength_patch, patch, strength_model, offset, function)]
            added.append(k)
        if ours:
            self.patches_uuid = uuid.uuid4()
        return added

    def load(self, device_to: torch.device | None = None, *args: Any, **kwargs: Any) -> None:
        super().load(device_to, *args, **kwargs)
        self._patch_quantized(device_to)

    def partially_unload(self, device_to: torch.device, *args: Any, **kwargs: Any) -> int:
        # ComfyUI restores the backups of parameters only. Put the quantized layers' original codes back first, so
        # no layer it offloads keeps patched codes *and* gets a per-forward patch; re-patch those that stay loaded.
        for key in [k for k in self.backup if k in self._quantized_keys()]:
            comfy.utils.set_attr_param(self.model, key, self.backup.pop(key).weight)
        freed = super().partially_unload(device_to, *args, **kwargs)
        self._patch_quantized(None)
        return freed

    def _patch_quantized(self, device_to: torch.device | None) -> None:
        """Apply this patcher's weight patches to quantized layers (ComfyUI patches only parameters)."""
        for key in [k for k in self.patches if k in self._quantized_keys() and k not in self.backup]:
            layer = comfy.utils.get_attr(self.model, key.rsplit(".", 1)[0])
            if any(isinstance(f, comfy.model_patcher.LowVramPatch) for f in layer.weight_function):
                continue  # left offloaded by lowvram: the layer applies the patch on every forward
            self.patch_weight_to_device(key, device_to=device_to or layer.weight_codes.device)


def is_fpq_model(patcher: Any) -> bool:
    """True for a MODEL made by fpq's nodes."""
    return bool(getattr(getattr(patcher, "model", None), "fpq_weight_keys", None))


# ---- checks on the input MODEL --------------------------------------------------------------------------------------
def check_float_model(patcher: Any) -> None:
    """Raise :class:`NodeInputError` unless ``patcher`` holds a full-precision diffusion model fpq can quantize."""
    if not isinstance(patcher, comfy.model_patcher.ModelPatcher):
        raise NodeInputError(f"expected a MODEL, got {type(patcher).__name__}")
    if is_fpq_model(patcher):
        raise NodeInputError(
            "this MODEL is already quantized by fpq; connect the full-precision model (from the UNet or checkpoint "
            "loader) instead, or use it as it is"
        )
    diffusion_model = patcher.get_model_object("diffusion_model")
    for name, module in diffusion_model.named_modules():
        if isinstance(module, QuantizedLayer):
            raise NodeInputError(f"layer {name} is already an fpq quantized layer; connect the full-precision model")
        if getattr(module, "quant_format", None) is not None or getattr(module, "layout_type", None) is not None:
            raise NodeInputError(
                f"layer {name} holds ComfyUI's own quantized weights (comfy_quant "
                f"{getattr(module, 'quant_format', None) or module.layout_type!r}); "
                "fpq quantizes full-precision models only: load the original fp16/bf16/fp32 file"
            )
        for pname, p in module.named_parameters(recurse=False):
            if type(p) not in (torch.Tensor, torch.nn.Parameter):
                raise NodeInputError(
                    f"{name}.{pname} is a {type(p).__name__}, i.e. an already-quantized model (GGUF, comfy_quant, "
                    "...); fpq quantizes full-precision models only: load the original fp16/bf16/fp32 file"
                )
            if p.dtype not in FLOAT_DTYPES:
                raise NodeInputError(
                    f"{name}.{pname} is stored as {str(p.dtype).removeprefix('torch.')}: the model was loaded with an "
                    "FP8 weight_dtype or is already quantized; set weight_dtype to 'default' in the loader and "
                    "connect that model"
                )


def quantizable_layers(patcher: Any, recipe: Recipe) -> list[str]:
    """Names (relative to ``diffusion_model``) of the Linear/Conv2d layers the recipe quantizes."""
    targets, _ = iter_quantizable(patcher.get_model_object("diffusion_model"), skip=recipe.skip)
    if not targets:
        raise NodeInputError("the diffusion model has no Linear or Conv2d layer fpq can quantize")
    return [name for name, _ in targets]


# ---- building the quantized MODEL -----------------------------------------------------------------------------------
def _share_or_copy(obj: Any, memo: dict) -> Any:
    try:
        return copy.deepcopy(obj, memo)
    except Exception:  # an object patch that cannot be copied (a bound function, a lock...): share it
        return obj


def float_snapshot(patcher: Any, layer_names: Iterable[str]) -> torch.nn.Module:
    """A separate copy of the input's model as the input MODEL sees it: its object patches and weight patches applied.

    The float weights of ``layer_names`` are shared with the original (they are read once, then replaced by
    quantized layers), so the copy costs little memory; everything else is copied, so the two models never share a
    tensor ComfyUI might move.
    """
    live = patcher.model
    memo: dict[int, Any] = {}
    if getattr(live, "current_patcher", None) is not None:
        memo[id(live.current_patcher)] = None
    if getattr(live, "model_config", None) is not None:
        memo[id(live.model_config)] = live.model_config  # shared: read-only, and its __getattr__ defeats deepcopy
    for name in layer_names:
        for p in patcher.get_model_object(DIFFUSION_PREFIX + name).parameters(recurse=False):
            memo[id(p)] = p
    snapshot = copy.deepcopy(live, memo)

    # Object patches: undo those of whichever clone is applied right now, then apply the input's own.
    for key, original in patcher.object_patches_backup.items():
        comfy.utils.set_attr(snapshot, key, _share_or_copy(original, memo))
    for key, obj in patcher.object_patches.items():
        comfy.utils.set_attr(snapshot, key, _share_or_copy(obj, memo))
    # Weight patches: originals where a clone has patched the live weights, then the input's own patches (baked).
    for key, backup in patcher.backup.items():
        current = comfy.utils.get_attr(snapshot, key)
        comfy.utils.set_attr_param(snapshot, key, backup.weight.to(current.device, current.dtype, copy=True))
    for key, patches in patcher.patches.items():
        current = comfy.utils.get_attr(snapshot, key)
        patched = comfy.lora.calculate_weight(patches, current.to(torch.float32, copy=True), key)
        comfy.utils.set_attr_param(snapshot, key, patched.to(current.dtype))

    # Forget the live model's loading state: the copy starts unloaded, unpatched.
    for module in snapshot.modules():
        if hasattr(module, "prev_comfy_cast_weights"):
            module.comfy_cast_weights = module.prev_comfy_cast_weights
            del module.prev_comfy_cast_weights
        for attr in ("weight_function", "bias_function"):
            if attr in module.__dict__:
                setattr(module, attr, [])
        module.__dict__.pop("comfy_patched_weights", None)
    for attr, value in (
        ("current_weight_patches_uuid", None),
        ("model_loaded_weight_memory", 0),
        ("lowvram_patch_counter", 0),
        ("model_lowvram", False),
        ("model_offload_buffer_memory", 0),
        ("current_patcher", None),
    ):
        if hasattr(snapshot, attr):
            setattr(snapshot, attr, value)
    return snapshot


def wrap_quantized(
    model: torch.nn.Module, recipe: Recipe, like: Any | None, load_device: Any, offload_device: Any,
    cuda_graphs: bool = True,
):  # fmt: skip
    """A new :class:`FPQModelPatcher` around ``model`` (model options, wrappers and callbacks copied from ``like``);
    ``cuda_graphs``: its diffusion model replays CUDA graphs (see :func:`set_cuda_graphs`)."""
    layer_names = adopt_layers(model.diffusion_model)
    set_cuda_graphs(model, cuda_graphs)
    model.fpq_weight_keys = frozenset(f"{DIFFUSION_PREFIX}{n}.weight" for n in layer_names)
    model.fpq_recipe = recipe
    model.to(offload_device)
    model.device = offload_device
    patcher = FPQModelPatcher(model, load_device=load_device, offload_device=offload_device)
    if like is not None:
        patcher.model_options = copy.deepcopy(like.model_options)
        patcher.weight_wrapper_patches = like.weight_wrapper_patches.copy()
        patcher.force_cast_weights = like.force_cast_weights
        for kind, by_key in like.wrappers.items():
            patcher.wrappers[kind] = {k: list(v) for k, v in by_key.items()}
        for kind, by_key in like.callbacks.items():
            patcher.callbacks[kind] = {k: list(v) for k, v in by_key.items()}
    return patcher


# ---- CUDA graphs ----------------------------------------------------------------------------------------------------
CUDA_GRAPHS_TOOLTIP = (
    "Replay the UNet from CUDA graphs on NVIDIA GPUs: the first step of each image size and batch captures (a "
    "fraction of a second), later steps skip Python's per-layer launch overhead (SD1.5 W8A8 about 2.5x faster per "
    "step than the plain fp16 model on an H200, with ComfyUI's default allocator or --disable-cuda-malloc). Falls "
    "back to normal calls by itself with ControlNet, attention patches, "
    "model wrappers or lowvram; turn off to rule it out when debugging."
)


def set_cuda_graphs(model: torch.nn.Module, enabled: bool) -> None:
    """Make the ComfyUI model's ``diffusion_model`` replay CUDA graphs (one capture per latent shape and batch;
    :mod:`fpq_plugin.integrations.cuda_graphs`), or plain eager calls when ``enabled`` is False. Calls that
    :func:`~fpq_plugin.integrations.comfyui_graphs.comfyui_unet_check` refuses, lowvram (weights left on the CPU)
    and CPU runs stay eager."""
    diffusion_model = model.diffusion_model
    if not enabled:
        disable_cuda_graphs(diffusion_model)
        return
    enable_cuda_graphs(
        diffusion_model,
        check=comfyui_unet_check,
        timestep_arg=("timesteps", 1),
        ignored_kwargs=("transformer_options",),
    )


def quant_cache() -> Any:
    """fpq's quantization cache in ComfyUI's models folder (``models/fpq_cache``, or where extra_model_paths says).

    Returns None (every run quantizes) when that folder cannot be written, after logging why.
    """
    import folder_paths

    from fpq_plugin.cache import QuantCache
    from fpq_plugin.errors import CheckpointError

    folders = folder_paths.get_folder_paths("fpq_cache") if "fpq_cache" in folder_paths.folder_names_and_paths else []
    try:
        return QuantCache(folders[0] if folders else os.path.join(folder_paths.models_dir, "fpq_cache"))
    except CheckpointError as e:
        logger.warning("fpq: quantizing without the cache: %s", e)
        return None


def quantized_copy(
    patcher: Any,
    recipe: Recipe,
    layer_names: list[str],
    *,
    quantize: Callable[[torch.nn.Module, list[str]], dict[str, Any]],
    cache: Any = None,
    cache_key_parts: dict[str, Any] | None = None,
) -> tuple[FPQModelPatcher, bool]:
    """Quantize a copy of the input MODEL's diffusion model; the input is left untouched.

    Args:
        patcher: the input MODEL.
        recipe: the recipe (as the method runs it: ``rounding`` set by the quality preset).
        layer_names: layers to quantize (from :func:`quantizable_layers`).
        quantize: ``quantize(diffusion_model, layer_names)`` quantizes the float copy in place (it runs only when
            the model is actually built) and returns a JSON-able summary of what it did, stored in the cache
            entry's header and later in saved files.
        cache: a :class:`fpq_plugin.cache.QuantCache`, or None to always build.
        cache_key_parts: ``prompt_set`` (or None), ``method_version`` and ``extra`` for
            :func:`fpq_plugin.cache.cache_key`; the float weights' fingerprint and the recipe are added here.

    Returns:
        The new MODEL and whether it came from the cache. ``model.model.fpq_method`` holds the summary.
    """
    snapshot = float_snapshot(patcher, layer_names)
    diffusion_model = snapshot.diffusion_model
    # Filled by build() before the cache writes the entry (the cache reads `extra` after building).
    header_extra: dict[str, Any] = {}

    def build() -> torch.nn.Module:
        header_extra["fpq_method"] = quantize(diffusion_model, layer_names)
        return diffusion_model

    hit = False
    if cache is None:
        build()
    else:
        from fpq_plugin.cache import cache_key
        from fpq_plugin.fingerprint import fingerprint_module

        parts = dict(cache_key_parts or {})
        fingerprint = fingerprint_module(diffusion_model)  # the float weights, with the input's LoRAs baked in
        key = cache_key(fingerprint, recipe, parts.pop("prompt_set", None), **parts)
        _, header, hit = cache.get_or_build(
            key, build, diffusion_model, recipe=recipe, model_fingerprint=fingerprint, extra=header_extra,
            device=patcher.offload_device,
        )  # fmt: skip
        if hit:
            header_extra["fpq_method"] = header.extra.get("fpq_method")
    snapshot.fpq_method = header_extra.get("fpq_method")
    return wrap_quantized(snapshot, recipe, patcher, patcher.load_device, patcher.offload_device), hit


def format_counts(patcher: Any) -> dict[str, int]:
    """``{weight format: number of layers}`` of an fpq MODEL."""
    counts: dict[str, int] = {}
    for module in patcher.model.diffusion_model.modules():
        if isinstance(module, QuantizedLayer):
            counts[module.weight_format.name] = counts.get(module.weight_format.name, 0) + 1
    return counts


# ---- files ----------------------------------------------------------------------------------------------------------
def _saveable(patcher: Any) -> torch.nn.Module:
    """The quantized diffusion model of an fpq MODEL, unpatched, ready to be written; typed errors otherwise."""
    if not is_fpq_model(patcher):
        raise NodeInputError(
            "this MODEL is not quantized by fpq; connect the output of 'FP Quantize UNet' or 'Load FP Quantized UNet'"
        )
    if any(k in patcher.model.fpq_weight_keys for k in patcher.patches):
        raise NodeInputError(
            "this MODEL carries weight patches (a LoRA) on quantized layers; connect the MODEL from before the LoRA "
            "loader: the file stores the quantized model alone, and LoRAs are applied after loading it"
        )
    diffusion_model = patcher.model.diffusion_model
    if patcher.backup or any(_ORIGINAL in m.__dict__ for m in diffusion_model.modules()):
        mm.unload_all_models()  # another clone's LoRA is applied in place right now: unloading restores the codes
    return diffusion_model


def save_model(patcher: Any, path: str) -> None:
    """Write the quantized diffusion model of an fpq MODEL (without any LoRA) to ``path`` (fpq's own format)."""
    diffusion_model = _saveable(patcher)
    save_quantized(
        diffusion_model,
        path,
        recipe=patcher.model.fpq_recipe,
        extra={
            "comfyui": {"key_layout": "ldm", "model_config": type(patcher.model.model_config).__name__},
            "fpq_method": getattr(patcher.model, "fpq_method", None),
        },
    )


def export_comfy_quant(patcher: Any, path: str) -> dict[str, int]:
    """Write an fpq MODEL as a ComfyUI-native ``comfy_quant`` UNet file (see :mod:`.comfy_quant`).

    Returns:
        Counts: FP8 Linear layers stored natively (bit-exact / requantized per tensor), input scales, layers
        dequantized to float.
    """
    from .comfy_quant import save_comfy_quant

    diffusion_model = _saveable(patcher)
    float_dtype = torch.bfloat16 if patcher.model.get_dtype() == torch.bfloat16 else torch.float16
    recipe = patcher.model.fpq_recipe
    method = getattr(patcher.model, "fpq_method", None) or {}
    provenance = {"tool": "fpq", "recipe": recipe.name, "method": method.get("preset")}
    return save_comfy_quant(diffusion_model, path, float_dtype=float_dtype, provenance=provenance)


def comfy_quant_supported() -> bool:
    """True when this ComfyUI loads ``comfy_quant`` checkpoints (>= 0.8)."""
    try:
        from comfy.quant_ops import QUANT_ALGOS
    except ImportError:
        return False
    return "float8_e4m3fn" in QUANT_ALGOS


def _float_state_shapes(path: str, header: Any) -> dict[str, torch.Tensor]:
    """Meta tensors with the *float* model's state dict shapes (what ComfyUI's model detection reads)."""
    from safetensors import safe_open

    quantized_prefixes = tuple(f"{name}." for name in header.layers)
    sd: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt") as fh:
        for key in fh.keys():
            if key.startswith(quantized_prefixes) and not key.endswith(".bias"):
                continue  # weight_codes, weight_scale, input_scale...: replaced by the float weight below
            sl = fh.get_slice(key)
            dtype = getattr(
                torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(sl.get_dtype(), "float32")
            )
            sd[key] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
    for name, spec in header.layers.items():
        layer = LAYER_KINDS[spec["kind"]].from_spec(spec, device="meta")
        dtype = getattr(torch, spec["bias_dtype"]) if spec.get("bias_dtype") else torch.float16
        sd[f"{name}.weight"] = torch.empty(layer.weight_shape, dtype=dtype, device="meta")
    return sd


def load_model(path: str, cuda_graphs: bool = True) -> FPQModelPatcher:
    """Build a ComfyUI MODEL from an fpq checkpoint saved by 'Save FP Quantized UNet' (LDM key layout);
    ``cuda_graphs`` as in :func:`set_cuda_graphs`."""
    header = read_header(path)
    if header.model is not None:
        raise NodeInputError(
            f"{path}\nwas saved from a diffusers {header.model['class']} (diffusers key names); ComfyUI needs a file "
            "saved by 'Save FP Quantized UNet'. Quantize the model inside ComfyUI with 'FP Quantize UNet' instead."
        )
    shapes = _float_state_shapes(path, header)
    model_config = comfy.model_detection.model_config_from_unet(shapes, "")
    if model_config is None:
        raise NodeInputError(f"{path}\nComfyUI does not recognise the model architecture stored in this file")
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    float_shapes = {k: v for k, v in shapes.items() if v.is_floating_point()}
    unet_dtype = mm.unet_dtype(
        model_params=comfy.utils.calculate_parameters(float_shapes),
        supported_dtypes=list(model_config.supported_inference_dtypes),
        weight_dtype=comfy.utils.weight_dtype(float_shapes),
    )
    manual_cast_dtype = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)
    model = model_config.get_model(shapes, "", device="meta")  # no float weights are allocated
    load_quantized(path, model=model.diffusion_model, device=offload_device)
    # Layers kept in full precision come in the file's dtype; ComfyUI's ops expect the inference dtype.
    for module in model.diffusion_model.modules():
        if not isinstance(module, QuantizedLayer):
            for name, p in module.named_parameters(recurse=False):
                if p.is_floating_point() and p.dtype != unet_dtype:
                    setattr(module, name, torch.nn.Parameter(p.detach().to(unet_dtype), requires_grad=False))
    model.fpq_method = header.extra.get("fpq_method")
    logger.info(
        "fpq: loaded %s (%s, %d quantized layers)", os.path.basename(path), header.recipe.name, len(header.layers)
    )
    return wrap_quantized(model, header.recipe, None, load_device, offload_device, cuda_graphs)


# ---- progress -------------------------------------------------------------------------------------------------------
class NodeProgress:
    """ComfyUI's progress bar over calibration steps then the quantization's units (or layers), with its cancel
    check at every update."""

    def __init__(self, calibration_steps: int, quantize_steps: int) -> None:
        self.calibration_steps = calibration_steps
        self.total = calibration_steps + quantize_steps
        self.done_steps = 0
        self.bar = comfy.utils.ProgressBar(self.total)

    def step(self) -> None:
        """One sampler step of calibration finished."""
        self.done_steps += 1
        self.bar.update_absolute(min(self.done_steps, self.calibration_steps), self.total)
        mm.throw_exception_if_processing_interrupted()

    def finish(self) -> None:
        """Everything is done (also after a cache hit, which skips the steps)."""
        self.bar.update_absolute(self.total, self.total)

    def quantize(self, done: int, total: int, name: str) -> None:
        """Progress callback of ``quantize_`` (layers) and of the method (units; also every 50 rounding
        iterations): ``done`` of ``total`` are finished. The total is only known once the method found its units."""
        self.total = self.calibration_steps + total
        self.bar.update_absolute(self.calibration_steps + done, self.total)
        mm.throw_exception_if_processing_interrupted()
