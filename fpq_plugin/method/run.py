"""The paper's method end to end: search, static activation scales and learned rounding, unit by unit.

For each reconstruction unit in execution order:

1. record the unit's inputs in the partially quantized model and its outputs in the full-precision model
   (quantized-model inputs, full-precision targets);
2. sample each layer's input rows and range while the unit runs on those inputs;
3. search each layer's weight format and per-channel scales, then its activation format and static scale, on the
   layer-output error (:mod:`fpq_plugin.method.search`);
4. learn the weight rounding of the whole unit against the full-precision targets (:mod:`fpq_plugin.method.rounding`),
   keeping round-to-nearest where learning did not help;
5. swap the unit's layers for quantized ones (the same :func:`fpq_plugin.api.build_quantized_layer` as ``quantize_``).

INT baselines run through exactly the same steps with INT formats, so FP and INT numbers share calibration data,
seeds and sampler.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fpq_plugin.api import LayerPlan, Progress, build_quantized_layer, iter_quantizable, set_submodule, weight_matrix
from fpq_plugin.backends.dequant import run_float_op
from fpq_plugin.errors import LayerQuantizationError
from fpq_plugin.formats import get_format
from fpq_plugin.method.capture import UNetCall
from fpq_plugin.method.config import MethodConfig, get_method_config
from fpq_plugin.method.rounding import SoftQuantLayer, reconstruct, set_nearest
from fpq_plugin.method.search import StatsCollector, search_activation, search_weight
from fpq_plugin.method.units import Unit, capture_unit_io, execution_order, find_units
from fpq_plugin.nn import QuantizedLayer
from fpq_plugin.recipes import Recipe, get_recipe

logger = logging.getLogger(__name__)


@dataclass
class MethodReport:
    """What the method chose and measured, per layer and per unit."""

    recipe: Recipe
    config: MethodConfig
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    units: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=lambda: {"capture": 0.0, "search": 0.0, "rounding": 0.0})

    def format_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for spec in self.layers.values():
            counts[spec["weight_format"]] = counts.get(spec["weight_format"], 0) + 1
        return counts


class _FrozenQuantized(nn.Module):
    """A finished quantized layer during calibration: same numerics as the ``dequant`` backend, weight dequantized
    once instead of on every one of the many forward passes that calibrating later units makes."""

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("w", layer.dequantized_weight(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_float_op(self.layer, x, self.w)


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def quantize_with_method(
    model: nn.Module,
    recipe: Recipe | str | dict[str, Any],
    calls: list[UNetCall],
    *,
    method: str | MethodConfig = "standard",
    skip: tuple[str, ...] | list[str] = (),
    layer_filter: Callable[[str, nn.Module], bool] | None = None,
    progress: Progress | None = None,
    backend: str = "auto",
) -> MethodReport:
    """Quantize ``model`` in place with the paper's method, calibrated on recorded UNet calls.

    Args:
        model: the full-precision UNet (diffusers or ComfyUI), on the device to compute on (a GPU if there is one).
        recipe: formats and which layers to skip; ``recipe.rounding == "learned"`` enables learned rounding
            (presets use ``"nearest"``; :func:`fpq_plugin.method.recipe_for` sets it from the method preset).
        calls: calibration inputs from :func:`~fpq_plugin.method.capture.record_unet_inputs`.
        method: ``"fast"``, ``"standard"``, ``"best"`` or a :class:`MethodConfig`.
        skip, layer_filter: layers kept in full precision (as in :func:`fpq_plugin.quantize_`).
        progress: ``progress(done, total, unit_name)`` after each unit; raise (e.g. ``CancelledError``) to cancel
            between units. It is also called (``done`` unchanged) before each layer's search, before every
            calibration call of the capture passes and every 50 rounding iterations, so a cancel is seen within
            one UNet call.
        backend: backend of the new quantized layers.

    Returns:
        A :class:`MethodReport`.
    """
    start_time = time.perf_counter()
    recipe = get_recipe(recipe)
    config = get_method_config(method)
    if not calls:
        raise LayerQuantizationError("no calibration calls were recorded; run the sampler inside record_unet_inputs")
    device = _model_device(model)
    targets, skipped = iter_quantizable(model, skip=recipe.skip + tuple(skip), layer_filter=layer_filter)
    report = MethodReport(recipe, config, skipped=skipped)
    if not targets:
        return report
    learn = recipe.rounding == "learned" and config.rounding_iters > 0
    # Full-precision targets for reconstruction; `model` itself is quantized in place as we go.
    fp_model = copy.deepcopy(model).eval() if learn else None
    model.eval()
    units = find_units(model, [n for n, _ in targets], blocks=config.block_reconstruction)
    units = execution_order(model, units, calls[0].to(device))
    del targets
    rows_per_call = max(16, math.ceil(config.search_rows / len(calls)))
    generator = torch.Generator().manual_seed(config.seed)

    frozen: dict[str, QuantizedLayer] = {}
    if learn:
        groups = [[unit] for unit in units]
    else:
        groups = _group_units(model, units, config)
    done = 0
    for group in groups:
        t0 = time.perf_counter()
        if learn:
            # Sequential reconstruction: this unit's inputs come from the model with every earlier unit quantized.
            unit = group[0]
            heartbeat = (lambda d=done, n=unit.name: progress(d, len(units), n)) if progress else None
            q_io = capture_unit_io(model, unit.name, calls, outputs=False, device=device, should_stop=heartbeat)
            if not q_io.args:
                raise LayerQuantizationError(
                    f"{unit.name}: the calibration calls never reach this layer; skip it with skip=[{unit.name!r}]"
                )
            float_layers = {name: model.get_submodule(name) for name in unit.layers}
            with StatsCollector(float_layers, rows_per_call, seed=config.seed + done) as collector, torch.no_grad():
                unit_module = model.get_submodule(unit.name)
                for args, kwargs in zip(q_io.args, q_io.kwargs):
                    unit_module(*args, **kwargs)
        else:
            # No learning: one full-precision pass per group of units collects every layer's statistics at once.
            q_io = None
            float_layers = {name: model.get_submodule(name) for unit in group for name in unit.layers}
            with StatsCollector(float_layers, rows_per_call, seed=config.seed + done) as collector, torch.no_grad():
                for call in calls:
                    if progress is not None:  # the cancel check per call: this pass can take minutes on a CPU
                        progress(done, len(units), group[0].name)
                    c = call.to(device)
                    model(*c.args, **c.kwargs)
        stats = collector.stats()
        del collector
        t1 = time.perf_counter()
        report.phases["capture"] += t1 - t0
        plans = {}
        for name, module in float_layers.items():
            if progress is not None:  # also the cancel check between layers: a group's search can take minutes on CPU
                progress(done, len(units), name)
            plans[name] = _search_layer(name, module, stats, recipe, config, report)
        del stats
        report.phases["search"] += time.perf_counter() - t1
        for unit in group:
            unit_result: dict[str, Any] = {"unit": unit.name, "layers": len(unit.layers), "block": unit.is_block}
            if learn:
                t2 = time.perf_counter()
                # The progress callback doubles as the cancel check every 50 rounding iterations.
                should_stop = (lambda d=done, n=unit.name: progress(d, len(units), n)) if progress else None
                unit_result.update(_learn_unit(model, fp_model, unit, float_layers, plans, q_io, calls, config,
                                               device, generator, should_stop))
                report.phases["rounding"] += time.perf_counter() - t2
            for name in unit.layers:
                layer = build_quantized_layer(float_layers[name], plans[name], name=name)
                layer.backend = backend
                frozen[name] = layer
                set_submodule(model, name, _FrozenQuantized(layer))
            unit_result["seconds"] = (time.perf_counter() - t0) / len(group)
            report.units.append(unit_result)
            done += 1
            if progress is not None:
                progress(done, len(units), unit.name)
        del q_io, float_layers

    for name, layer in frozen.items():
        set_submodule(model, name, layer)
    report.seconds = time.perf_counter() - start_time
    logger.info("fpq: %s/%s quantized %d layers in %.1f s (%s)", recipe.name, config.name, len(report.layers),
                report.seconds, report.format_counts())
    return report


def _search_layer(name: str, module: nn.Module, stats, recipe: Recipe, config: MethodConfig,
                  report: MethodReport) -> LayerPlan:
    """Weight format and scales, then activation format and scale, for one layer."""
    candidates = recipe.weight_formats if config.search_formats else recipe.weight_formats[:1]
    qweight, weight_errors = search_weight(
        weight_matrix(module), candidates, stats.get(name),
        shrink_factors=config.weight_shrink_factors, granularity=recipe.weight_granularity,
    )
    plan = LayerPlan(qweight)
    act_errors: dict[str, float] = {}
    if recipe.quantizes_activations:
        if name not in stats:
            raise LayerQuantizationError(
                f"{name}: no input was observed during calibration; skip it with skip=[{name!r}]"
            )
        fmt, scale, zp, act_errors = search_activation(
            stats[name], qweight.dequantize(), recipe.activation_candidates(), shrink_factors=config.act_shrink_factors
        )
        plan = LayerPlan(qweight, fmt, scale, zp)
    report.layers[name] = {
        "weight_format": qweight.format.name,
        "input_format": plan.input_format,
        "weight_search_error": weight_errors,
        "activation_search_error": act_errors,
    }
    return plan


def _group_units(model: nn.Module, units: list[Unit], config: MethodConfig, budget_bytes: int = 2**30) -> list[list[Unit]]:
    """Consecutive units whose sampled input rows fit in ``budget_bytes`` together (bounded memory, few passes)."""
    groups: list[list[Unit]] = [[]]
    used = 0
    for unit in units:
        cost = sum(config.search_rows * weight_matrix(model.get_submodule(n)).shape[1] * 4 for n in unit.layers)
        if groups[-1] and used + cost > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(unit)
        used += cost
    return groups


def _learn_unit(model, fp_model, unit, float_layers, plans, q_io, calls, config, device, generator,
                should_stop=None):
    """Learned rounding of one unit; updates ``plans`` with the hardened codes."""
    fp_io = capture_unit_io(fp_model, unit.name, calls, outputs=True, device=device, should_stop=should_stop)
    soft_layers = {}
    for name, module in float_layers.items():
        plan = plans[name]
        act = None
        if plan.input_format is not None:
            act = (
                get_format(plan.input_format),
                torch.tensor(plan.input_scale, device=device),
                torch.tensor(plan.input_zero_point, device=device) if plan.input_zero_point is not None else None,
            )
        soft = SoftQuantLayer(module, plan.weight, act, config.quantize_acts_during_rounding,
                              step_aware=config.step_aware_rounding).to(device)
        soft_layers[name] = soft
        set_submodule(model, name, soft)
    unit_module = model.get_submodule(unit.name)
    for p in unit_module.parameters():
        p.requires_grad_(False)
    for soft in soft_layers.values():
        soft.v.requires_grad_(True)
    try:
        result = reconstruct(unit_module, list(soft_layers.values()), (q_io.args, q_io.kwargs), fp_io.outputs,
                             config, generator=generator, should_stop=should_stop)
        if result["learned"] > result["nearest"]:
            # Too few iterations to beat round-to-nearest on this unit: keep nearest rather than ship a regression.
            set_nearest(list(soft_layers.values()))
            result["kept"] = "nearest"
        else:
            result["kept"] = "learned"
        for name, soft in soft_layers.items():
            plans[name] = LayerPlan(soft.hardened(), plans[name].input_format, plans[name].input_scale,
                                    plans[name].input_zero_point)
    finally:
        for name, module in float_layers.items():
            set_submodule(model, name, module)
    return result
