"""Reconstruction units: the blocks (and leftover layers) that learned rounding optimises one at a time.

BRECQ-style reconstruction works unit by unit in execution order. A *block unit* is a ResNet block or a
transformer block (diffusers' ``ResnetBlock2D`` / ``BasicTransformerBlock``, ComfyUI's ``ResBlock`` /
``BasicTransformerBlock``, matched by class name so ComfyUI need not be importable); every quantizable layer outside
such a block (conv_in, time embedding, proj_in/out, down/upsamplers, conv_out) is a *layer unit* of its own.

:func:`capture_unit_io` runs the whole model on calibration calls and records what one unit receives (and
returns), stopping each forward right after that unit so later blocks cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fpq_plugin.method.capture import UNetCall
from fpq_plugin.nn import quantized_type_for

BLOCK_CLASS_NAMES = ("ResnetBlock2D", "BasicTransformerBlock", "ResBlock")


@dataclass
class Unit:
    """A block or a single layer, with the qualified names of the quantizable layers it contains."""

    name: str
    layers: list[str] = field(default_factory=list)
    is_block: bool = False


def find_units(model: nn.Module, targets: Iterable[str], *, blocks: bool = True) -> list[Unit]:
    """Group the target layers into units (blocks when ``blocks``), in module-definition order."""
    targets = list(targets)
    units: list[Unit] = []
    claimed: set[str] = set()
    if blocks:
        for name, module in model.named_modules():
            if type(module).__name__ not in BLOCK_CLASS_NAMES or any(name.startswith(u.name + ".") for u in units):
                continue
            inside = [t for t in targets if t.startswith(name + ".")]
            if inside:
                units.append(Unit(name, inside, is_block=True))
                claimed.update(inside)
    units += [Unit(t, [t]) for t in targets if t not in claimed]
    return units


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


def execution_order(model: nn.Module, units: list[Unit], call: UNetCall) -> list[Unit]:
    """Sort units by when the model first runs them on ``call`` (units never run go last)."""
    first: dict[str, int] = {}
    handles = []
    for unit in units:

        def hook(_m, _a, _name=unit.name) -> None:
            first.setdefault(_name, len(first))

        handles.append(model.get_submodule(unit.name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    return sorted(units, key=lambda u: first.get(u.name, len(first)))


@dataclass
class UnitIO:
    """Inputs (and optionally outputs) a unit saw, one entry per calibration call."""

    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]
    outputs: list[torch.Tensor] | None


def capture_unit_io(
    model: nn.Module,
    unit_name: str,
    calls: list[UNetCall],
    *,
    outputs: bool,
    device: torch.device,
    should_stop: Callable[[], None] | None = None,
) -> UnitIO:
    """Run ``model`` on each call and record the first invocation of ``unit_name`` (inputs; outputs if asked).

    ``should_stop()`` is called before every call; raising there cancels (a pass over all calls can take minutes).
    """
    module = model.get_submodule(unit_name)
    io = UnitIO([], [], [] if outputs else None)
    state: dict[str, Any] = {}

    def pre(_m, args, kwargs):
        state["args"], state["kwargs"] = args, kwargs
        if not outputs:
            raise _StopForward

    def post(_m, _args, _kwargs, out):
        state["out"] = out
        raise _StopForward

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True)]
    if outputs:
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            for call in calls:
                if should_stop is not None:
                    should_stop()
                state.clear()
                c = call.to(device)
                try:
                    model(*c.args, **c.kwargs)
                except _StopForward:
                    pass
                if "args" not in state:
                    continue  # this call never reached the unit
                io.args.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in state["args"]))
                io.kwargs.append({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in state["kwargs"].items()})
                if outputs:
                    io.outputs.append(state["out"].detach())
    finally:
        for h in handles:
            h.remove()
    return io


def quantizable_layer_names(model: nn.Module, skip_names: set[str]) -> list[str]:
    return [n for n, m in model.named_modules() if quantized_type_for(m) is not None and n not in skip_names]
