"""Learned rounding on the FP grid: AdaRound with a per-element step.

FP quantization is integer rounding with a step that depends on each element's binade: for a value ``u`` (the weight
divided by its channel scale) the grid spacing is ``step(u) = 2^(max(floor(log2|u|), 1 - bias) - m)``, the same
for every element of one binade and the subnormal step below the smallest normal. So every weight element has two
neighbouring grid points, ``floor(u / step) * step`` and one step above; AdaRound learns which one to take:

    soft:  q(u) = clamp(floor(u / step) * step + h(V) * step, -max, max),   h(V) = clamp(sigmoid(V)(zeta - gamma) + gamma, 0, 1)
    hard:  h(V) replaced by [V >= 0]

The step is detached (fixed from the float weight), ``V`` starts where ``h(V)`` equals the fractional position so the
soft weight starts at the float weight, and the regulariser ``lambda * sum(1 - |2h(V) - 1|^beta)`` (beta annealed
from 20 to 2 after a warm-up) pushes every ``h`` to 0 or 1. Rounding up from the top of a binade lands on the first
value of the next binade, which is on the grid; only the top of the range needs the clamp. INT formats use the same
code with a step of 1 and the zero point.

``MethodConfig.step_aware_rounding`` (on by default) is FP4DiT's variant, ``h = rect_sigmoid(V / step)``: Adam moves
every ``V`` at about the same rate, so dividing by the step makes elements on fine steps (small weights) learn
their rounding faster than elements on coarse steps.

Reconstruction (:func:`reconstruct`) optimises all ``V`` of a unit (a block or a layer) so its output on
quantized-model inputs matches the full-precision model's output of that unit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fpq_plugin.formats import Format
from fpq_plugin.method.config import MethodConfig
from fpq_plugin.quantizers import QuantizedWeight, encode_weight, fake_quantize_activation

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def grid_floor_and_step(u: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower grid neighbour and local step of ``u`` (already divided by the scale; INT: shifted by the zero point).

    ``u`` is clipped to the format's range first (a clipping scale puts some weights outside it), so both neighbours
    are always grid values.
    """
    if fmt.kind == "int":
        u = u.clamp(0, fmt.qmax)
        return torch.floor(u), torch.ones_like(u)
    u = u.clamp(-fmt.max_value, fmt.max_value)
    min_exp = 1 - fmt.bias
    exp = torch.floor(torch.log2(u.abs().clamp_min(2.0**-126)))
    step = torch.exp2(torch.clamp(exp, min=min_exp) - fmt.man_bits)
    return torch.floor(u / step) * step, step


class _STERound(torch.autograd.Function):
    """Fake-quantize activations forward, pass gradients straight through."""

    @staticmethod
    def forward(ctx, x, fmt, scale, zero_point):
        return (fake_quantize_activation(x, fmt, scale, zero_point) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class SoftQuantLayer(nn.Module):
    """Stands in for a Linear/Conv2d during reconstruction: learnable rounding of its weight, static input quantizer."""

    def __init__(self, module: nn.Module, qweight: QuantizedWeight, act: tuple | None, quantize_acts: bool,
                 step_aware: bool = False) -> None:
        super().__init__()
        self.module = module  # geometry and bias; its float weight is the starting point
        self.fmt = qweight.format
        w = module.weight.detach().float().reshape(module.weight.shape[0], -1)
        self.register_buffer("scale", qweight.scale.float().reshape(-1, 1))
        zp = qweight.zero_point
        self.register_buffer("zero_point", zp.float().reshape(-1, 1) if zp is not None else None)
        u = w / self.scale + (self.zero_point if self.zero_point is not None else 0)
        floor, step = grid_floor_and_step(u, self.fmt)
        self.register_buffer("floor", floor)
        self.register_buffer("step", step)
        rest = ((u - floor) / step).clamp(0.0, 1.0)
        # h(V) = rest at the start: V = -log((zeta - gamma) / (rest - gamma) - 1), kept finite at the ends.
        self.register_buffer("nearest_up", rest >= 0.5)
        rest = rest.clamp(1e-4, 1 - 1e-4)
        v0 = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        # step_aware: h = rect_sigmoid(V / step), V = step * v0 (FP4DiT); V's sign, hence hard rounding, is the same
        self.step_aware = step_aware
        self.v = nn.Parameter(v0 * step if step_aware else v0)
        self.act = act if quantize_acts else None
        self.hard = False

    def soft_h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v / self.step if self.step_aware else self.v)

    def grid_values(self) -> torch.Tensor:
        h = (self.v >= 0).float() if self.hard else self.soft_h()
        q = self.floor + h * self.step
        if self.fmt.kind == "int":
            return q.clamp(0, self.fmt.qmax) - self.zero_point
        return q.clamp(-self.fmt.max_value, self.fmt.max_value)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.soft_h() - 1).abs().pow(beta)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.grid_values() * self.scale).reshape(self.module.weight.shape).to(x.dtype)
        if self.act is not None:
            fmt, scale, zp = self.act
            x = _STERound.apply(x, fmt, scale, zp)
        bias = self.module.bias
        if isinstance(self.module, nn.Linear):
            return F.linear(x, w, bias)
        m = self.module
        return F.conv2d(x, w, bias, m.stride, m.padding, m.dilation, m.groups)

    def hardened(self) -> QuantizedWeight:
        """The learned rounding as codes (exactly on the grid)."""
        with torch.no_grad():
            self.hard = True
            values = self.grid_values()
            zp = self.zero_point.reshape(-1) if self.zero_point is not None else None
            scale = self.scale.reshape(-1)
            codes = encode_weight(values * self.scale, self.fmt, scale, zp)
        return QuantizedWeight(self.fmt, codes, scale, zp)


def reconstruct(
    unit: nn.Module,
    soft_layers: list[SoftQuantLayer],
    inputs: tuple[list, list],
    targets: list[torch.Tensor],
    config: MethodConfig,
    *,
    generator: torch.Generator,
    should_stop: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Learn the rounding of ``soft_layers`` (already installed inside ``unit``) to match ``targets``.

    Returns the mean squared error of the unit output before (soft start = float weights rounded to nearest is not
    measured) and after, with hard rounding: ``{"nearest": ..., "learned": ...}``.
    """
    args_list, kwargs_list = inputs
    params = [layer.v for layer in soft_layers]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    iters = config.rounding_iters
    warm = int(config.warmup * iters)

    def loss_on(i: int) -> torch.Tensor:
        out = unit(*args_list[i], **kwargs_list[i])
        diff = (out.float() - targets[i].float()).pow(2)
        return diff.sum(1).mean() if diff.dim() > 1 else diff.mean()

    def evaluate(hard: bool) -> float:
        for layer in soft_layers:
            layer.hard = hard
        with torch.no_grad():
            total = sum(float(loss_on(i)) for i in range(len(targets)))
        for layer in soft_layers:
            layer.hard = False
        return total / max(len(targets), 1)

    nearest = evaluate_nearest(soft_layers, evaluate)
    with torch.enable_grad():
        for step in range(iters):
            if should_stop is not None and step % 50 == 0:
                should_stop()
            i = int(torch.randint(len(targets), (1,), generator=generator))
            rec = loss_on(i)
            if step < warm:
                loss = rec
            else:
                progress = (step - warm) / max(iters - warm, 1)
                beta = config.beta_end + (config.beta_start - config.beta_end) * (1 - progress)
                loss = rec + config.reg_weight * sum(layer.regulariser(beta) for layer in soft_layers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    learned = evaluate(hard=True)
    return {"nearest": nearest, "learned": learned}


def set_nearest(soft_layers: list[SoftQuantLayer]) -> list[torch.Tensor]:
    """Set every V so that hard rounding is round-to-nearest; returns the previous V for :func:`restore`."""
    saved = [layer.v.detach().clone() for layer in soft_layers]
    with torch.no_grad():
        for layer in soft_layers:
            layer.v.copy_(torch.where(layer.nearest_up, 1.0, -1.0))
    return saved


def restore(soft_layers: list[SoftQuantLayer], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for layer, v in zip(soft_layers, saved):
            layer.v.copy_(v)


def evaluate_nearest(soft_layers: list[SoftQuantLayer], evaluate: Callable[[bool], float]) -> float:
    """Unit error with every weight rounded to nearest."""
    saved = set_nearest(soft_layers)
    err = evaluate(True)
    restore(soft_layers, saved)
    return err
