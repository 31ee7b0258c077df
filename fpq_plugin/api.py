"""``quantize_``: swap a model's Linear and Conv2d layers for quantized ones, in place.

Works on any ``nn.Module`` tree: diffusers' ``UNet2DConditionModel`` (SD1.x, SD2.x, SDXL) and ComfyUI's UNet classes
(whose ops subclass ``nn.Linear``/``nn.Conv2d``). The default path is data-free for the weights (format choice and
scales from the weight itself, round-to-nearest) plus static activation scales observed while a user-supplied
``calibration_fn`` runs the float model. The paper's method (:mod:`fpq_plugin.method`) produces per-layer
:class:`LayerPlan` objects and hands them to the same function, so there is one way layers get swapped.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fpq_plugin.errors import LayerQuantizationError
from fpq_plugin.nn import QuantizedLayer, quantized_type_for
from fpq_plugin.nn.fused_geglu import fuse_geglu, link_feed_forward
from fpq_plugin.nn.fused_layer_norm import fuse_block_norm_for
from fpq_plugin.nn.fused_group_norm import fuse_group_norms_beside
from fpq_plugin.quantizers import QuantizedWeight, activation_params, choose_weight_format
from fpq_plugin.recipes import Recipe, get_recipe

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
LayerFilter = Callable[[str, nn.Module], bool]


@dataclass
class LayerPlan:
    """Everything needed to build one quantized layer.

    Attributes:
        weight: codes and scales (from round-to-nearest or learned rounding).
        input_format: activation format name, or ``None`` for weight-only.
        input_scale, input_zero_point: the static activation quantizer.
    """

    weight: QuantizedWeight
    input_format: str | None = None
    input_scale: float | None = None
    input_zero_point: float | None = None


@dataclass
class QuantizationReport:
    """What ``quantize_`` did: per-layer formats, skipped layers and byte counts."""

    recipe: Recipe
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    float_bytes: int = 0
    quantized_bytes: int = 0

    def format_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for spec in self.layers.values():
            counts[spec["weight_format"]] = counts.get(spec["weight_format"], 0) + 1
        return counts


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The float weight of a Linear/Conv2d as the ``(N, K)`` matrix quantized layers store."""
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def iter_quantizable(
    model: nn.Module, *, skip: tuple[str, ...] = (), layer_filter: LayerFilter | None = None
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """Split the model's Linear/Conv2d layers into (targets, skipped names)."""
    targets, skipped, seen = [], [], set()
    for name, module in model.named_modules():
        if quantized_type_for(module) is None or id(module) in seen:
            continue
        seen.add(id(module))
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip) or (
            layer_filter is not None and not layer_filter(name, module)
        ):
            skipped.append(name)
        else:
            targets.append((name, module))
    return targets, skipped


@contextlib.contextmanager
def observe_input_ranges(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[float]]]:
    """Record ``[min, max]`` of every input the given modules see; hooks are removed on exit, errors included."""
    ranges: dict[str, list[float]] = {}

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            lo, hi = float(x.min()), float(x.max())
            old = ranges.get(name)
            ranges[name] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        yield ranges
    finally:
        for h in handles:
            h.remove()


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at the dotted path ``name``.

    Installing a quantized layer also gives its neighbours fpq's fused kernels: the GEGLU whose ``proj`` it is
    (:mod:`fpq_plugin.nn.fused_geglu`, linked to its feed-forward so that it can write the next Linear's FP8 input),
    the transformer-block LayerNorm it reads (:mod:`fpq_plugin.nn.fused_layer_norm`) and the GroupNorms beside it
    (:mod:`fpq_plugin.nn.fused_group_norm`), so every way of building a quantized model (quantize, the method,
    loading a checkpoint or a cache entry, the ComfyUI nodes) gets them.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    if isinstance(module, QuantizedLayer):
        if child == "proj" and fuse_geglu(parent):
            ff_name = parent_name.rpartition(".")[0]
            link_feed_forward(model.get_submodule(ff_name) if ff_name else model, parent)
        fuse_block_norm_for(model, name)
        fuse_group_norms_beside(parent)


def build_quantized_layer(module: nn.Module, plan: LayerPlan, *, name: str = "<layer>") -> QuantizedLayer:
    """A filled quantized layer equivalent to ``module`` under ``plan``."""
    q_type = quantized_type_for(module)
    if q_type is None:
        raise LayerQuantizationError(f"{name}: {type(module).__name__} is not a quantizable Linear/Conv2d")
    layer = q_type.empty_like(module, plan.weight.format, plan.input_format, per_channel=plan.weight.scale.numel() > 1)
    try:
        layer.set_weight(plan.weight)
    except (LayerQuantizationError, RuntimeError) as e:
        raise LayerQuantizationError(f"{name}: {e}") from None
    if module.bias is not None:
        layer.bias.data.copy_(module.bias.detach())
    if plan.input_format is not None:
        if plan.input_scale is None:
            raise LayerQuantizationError(f"{name}: the plan quantizes activations but has no input scale")
        layer.set_input_quantizer(plan.input_scale, plan.input_zero_point)
    return layer


def default_plan(
    module: nn.Module, recipe: Recipe, input_range: list[float] | None, *, name: str = "<layer>"
) -> LayerPlan:
    """Round-to-nearest plan: weight format chosen by weight error, activation scale from the observed range."""
    w = weight_matrix(module)
    qweight = choose_weight_format(
        w, recipe.weight_formats, granularity=recipe.weight_granularity, scale_method=recipe.weight_scale_method
    )
    if not recipe.quantizes_activations:
        return LayerPlan(qweight)
    if input_range is None:
        raise LayerQuantizationError(
            f"{name}: no activation range was observed (the calibration run never called this layer); "
            "skip it with skip=[...] or make the calibration run reach it"
        )
    # Without data the per-layer e4m3/e5m2 choice cannot be made; 'auto' falls back to e4m3fn here and is decided
    # on layer-output error by fpq_plugin.method.
    act_format = recipe.activation_candidates()[0]
    lo, hi = input_range
    scale, zp = activation_params(act_format, max(abs(lo), abs(hi)) if act_format != "int8" else hi, lo, layer=name)
    return LayerPlan(qweight, act_format, scale, zp)


def quantize_(
    model: nn.Module,
    recipe: Recipe | str | dict[str, Any],
    *,
    calibration_fn: Callable[[nn.Module], Any] | None = None,
    input_ranges: dict[str, list[float]] | None = None,
    plans: dict[str, LayerPlan] | None = None,
    skip: tuple[str, ...] | list[str] = (),
    layer_filter: LayerFilter | None = None,
    backend: str = "auto",
    progress: Progress | None = None,
) -> QuantizationReport:
    """Quantize ``model``'s Linear and Conv2d layers in place.

    Args:
        model: any module tree (a diffusers UNet, a ComfyUI ``diffusion_model``, ...).
        recipe: a :class:`~fpq_plugin.recipes.Recipe`, a preset name (``"w8a8"``, ``"w4a8"``...), a dict or a YAML
            path.
        calibration_fn: called once as ``calibration_fn(model)`` on the *float* model to observe activation ranges;
            required when the recipe quantizes activations and neither ``input_ranges`` nor ``plans`` cover a layer.
        input_ranges: ``{layer name: [min, max]}`` observed elsewhere.
        plans: ``{layer name: LayerPlan}`` computed elsewhere (search, learned rounding); they take precedence.
        skip: extra glob patterns of layer names kept in full precision (added to ``recipe.skip``).
        layer_filter: ``(name, module) -> bool``; layers for which it returns False are kept in full precision.
        backend: backend name every new layer uses (``"auto"``, ``"reference"``, ``"dequant"``...).
        progress: ``progress(done, total, layer_name)`` after each layer; raising from it (for example
            :class:`~fpq_plugin.errors.CancelledError`) stops between layers, leaving finished layers swapped.

    Returns:
        A :class:`QuantizationReport`.

    Example:
        >>> report = quantize_(unet, "w8a8", calibration_fn=lambda m: m(**example_inputs))
    """
    recipe = get_recipe(recipe)
    plans = dict(plans or {})
    targets, skipped = iter_quantizable(model, skip=recipe.skip + tuple(skip), layer_filter=layer_filter)
    report = QuantizationReport(recipe, skipped=skipped)
    if not targets:
        logger.warning("fpq: quantize_ found no Linear/Conv2d layer to quantize in %s", type(model).__name__)
        return report

    ranges = dict(input_ranges or {})
    if recipe.quantizes_activations:
        missing = {n: m for n, m in targets if n not in plans and n not in ranges}
        if missing:
            if calibration_fn is None:
                raise LayerQuantizationError(
                    f"recipe {recipe.name!r} quantizes activations, so it needs calibration: pass "
                    "calibration_fn=<function that runs the model on representative inputs>, or use a weight-only "
                    f"recipe (w8a16, w4a16). {len(missing)} layers lack an activation range, e.g. {next(iter(missing))}"
                )
            with torch.no_grad(), observe_input_ranges(missing) as observed:
                calibration_fn(model)
            ranges.update(observed)
            del missing

    total = len(targets)
    for i in range(total):
        # Drop our reference to each float layer as soon as it is swapped, so its weight can be freed at once
        # (peak memory stays near one model, not float + quantized).
        name, module = targets[i]
        targets[i] = None
        plan = plans.pop(name, None) or default_plan(module, recipe, ranges.get(name), name=name)
        layer = build_quantized_layer(module, plan, name=name)
        layer.backend = backend
        report.float_bytes += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        report.quantized_bytes += layer.quantized_bytes()
        report.layers[name] = layer.layer_spec()
        set_submodule(model, name, layer)
        if progress is not None:
            progress(i + 1, total, name)
    counts = ", ".join(f"{n} {f}" for f, n in sorted(report.format_counts().items()))
    logger.info("fpq: quantized %d layers (%s) with recipe %s", len(report.layers), counts, recipe.name)
    return report


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """``{name: layer}`` of every quantized layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def set_backend(model: nn.Module, backend: str) -> None:
    """Point every quantized layer of ``model`` at ``backend``."""
    from fpq_plugin.backends import get_backend

    if backend != "auto":
        get_backend(backend)
    for layer in quantized_layers(model).values():
        layer.backend = backend


def state_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (what a checkpoint of the model holds)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
