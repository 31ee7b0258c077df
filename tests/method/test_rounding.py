from __future__ import annotations

import torch
from helpers import randn
from torch import nn

from fpq_plugin.formats import get_format
from fpq_plugin.method import MethodConfig
from fpq_plugin.method.rounding import SoftQuantLayer, grid_floor_and_step, reconstruct
from fpq_plugin.method.search import LayerStats, search_weight

CONFIG = MethodConfig("test", rounding_iters=400, lr=1e-2)


def test_grid_neighbours_bracket_every_value_on_the_fp_grid() -> None:
    for name in ("e2m1", "e3m0", "e1m2", "e4m3fn"):
        fmt = get_format(name)
        u = randn(5000, seed=1) * fmt.max_value / 3
        floor, step = grid_floor_and_step(u, fmt)
        grid = torch.cat([fmt.positive_grid(), -fmt.positive_grid()])
        for candidate in (floor, (floor + step).clamp(-fmt.max_value, fmt.max_value)):
            assert torch.isin(candidate, grid).all(), name
        clipped = u.clamp(-fmt.max_value, fmt.max_value)  # values beyond the range are clipped first
        assert ((floor <= clipped) & (clipped <= floor + step)).all()


def _layer_problem(seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.Linear(64, 32)
    x = randn(8, 256, 64, seed=seed) @ (randn(64, 64, seed=seed + 1) / 8)  # correlated inputs: rounding matters
    qweight, _ = search_weight(layer.weight, ("e2m1",), LayerStats(x.reshape(-1, 64), 0, 1),
                               shrink_factors=(1.0, 0.9, 0.8, 0.7))
    with torch.no_grad():
        targets = [layer(xi) for xi in x]
    return layer, qweight, x, targets


def test_learned_rounding_beats_nearest_on_a_layer_by_a_clear_margin() -> None:
    layer, qweight, x, targets = _layer_problem()
    soft = SoftQuantLayer(layer, qweight, None, quantize_acts=False)
    result = reconstruct(soft, [soft], ([(xi,) for xi in x], [{} for _ in x]), targets, CONFIG,
                         generator=torch.Generator().manual_seed(0))
    assert result["learned"] < 0.8 * result["nearest"], result
    hardened = soft.hardened()
    assert hardened.format.name == "e2m1"
    deq = hardened.dequantize()
    grid = torch.cat([get_format("e2m1").positive_grid(), -get_format("e2m1").positive_grid()])
    assert torch.isin(deq / qweight.scale[:, None], grid).all()  # exactly on the grid


class _Block(nn.Module):
    """A residual MLP block: two layers learned jointly (block reconstruction)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(48, 96), nn.Linear(96, 48)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.silu(self.fc1(x)))


def test_learned_rounding_beats_nearest_on_a_block() -> None:
    torch.manual_seed(0)
    block = _Block()
    x = randn(8, 128, 48, seed=3) @ (randn(48, 48, seed=4) / 7)
    with torch.no_grad():
        targets = [block(xi) for xi in x]
    softs = []
    for name in ("fc1", "fc2"):
        layer = getattr(block, name)
        qweight, _ = search_weight(layer.weight, ("e2m1",), None, shrink_factors=(1.0, 0.9, 0.8))
        soft = SoftQuantLayer(layer, qweight, None, quantize_acts=False)
        setattr(block, name, soft)
        softs.append(soft)
    result = reconstruct(block, softs, ([(xi,) for xi in x], [{} for _ in x]), targets, CONFIG,
                         generator=torch.Generator().manual_seed(0))
    assert result["learned"] < 0.85 * result["nearest"], result


def test_int_grid_uses_unit_steps() -> None:
    fmt = get_format("int4")
    floor, step = grid_floor_and_step(torch.tensor([0.2, 3.7, 14.5]), fmt)
    assert floor.tolist() == [0.0, 3.0, 14.0] and step.tolist() == [1.0, 1.0, 1.0]


def test_step_aware_rounding_starts_at_the_float_weight_and_learns() -> None:
    """FP4DiT's variant: h = rect_sigmoid(V / step). It must start where plain AdaRound starts (same soft weight,
    same hard rounding) and still beat round-to-nearest."""
    layer, qweight, x, targets = _layer_problem(seed=2)
    plain = SoftQuantLayer(layer, qweight, None, quantize_acts=False)
    aware = SoftQuantLayer(layer, qweight, None, quantize_acts=False, step_aware=True)
    assert not torch.equal(aware.v, plain.v)  # V is scaled by the step...
    torch.testing.assert_close(aware.grid_values(), plain.grid_values())  # ...the soft weight is not
    for s in (plain, aware):
        s.hard = True
    assert torch.equal(aware.grid_values(), plain.grid_values())
    aware.hard = False
    result = reconstruct(aware, [aware], ([(xi,) for xi in x], [{} for _ in x]), targets, CONFIG,
                         generator=torch.Generator().manual_seed(0))
    assert result["learned"] < 0.8 * result["nearest"], result
