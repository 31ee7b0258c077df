from __future__ import annotations

import torch
from helpers import randn
from torch import nn

from fpq_plugin.method.search import LayerStats, StatsCollector, search_activation, search_weight

FP4 = ("e2m1", "e3m0", "e1m2")
FACTORS = tuple(round(1.0 - 0.05 * i, 2) for i in range(13))


def _output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ w.T - x @ w_hat.T).pow(2).sum())


def _correlated_inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    mix = randn(k, k, seed=seed + 1) / k**0.5
    return randn(rows, k, seed=seed) @ mix + 0.3 * randn(1, k, seed=seed + 2)


def test_search_picks_the_format_with_the_lowest_output_error() -> None:
    for seed, w in enumerate([randn(24, 64, seed=5), randn(24, 64, seed=6) ** 3, torch.rand(24, 64) - 0.5]):
        x = _correlated_inputs(512, 64, seed)
        chosen, errors = search_weight(w, FP4, LayerStats(x, float(x.min()), float(x.max())), shrink_factors=FACTORS)
        actual = {}
        for fmt in FP4:
            single, _ = search_weight(w, (fmt,), LayerStats(x, 0, 1), shrink_factors=FACTORS)
            actual[fmt] = _output_error(x, w, single.dequantize())
        assert chosen.format.name == min(actual, key=actual.get)
        # The Hessian shortcut scores exactly the output error, relative to the output energy.
        energy = float((x @ w.T).pow(2).sum())
        for fmt in FP4:
            assert abs(errors[fmt] - actual[fmt] / energy) <= 1e-3 * max(errors[fmt], 1e-9)


def test_output_aware_search_beats_weight_only_search_on_output_error() -> None:
    w = randn(32, 96, seed=3)
    x = _correlated_inputs(1024, 96, seed=4)
    data_aware, _ = search_weight(w, ("e2m1",), LayerStats(x, 0, 1), shrink_factors=FACTORS)
    data_free, _ = search_weight(w, ("e2m1",), None, shrink_factors=FACTORS)
    assert _output_error(x, w, data_aware.dequantize()) <= _output_error(x, w, data_free.dequantize())


def test_activation_search_prefers_e5m2_for_huge_dynamic_range_and_e4m3_otherwise() -> None:
    w = randn(16, 32, seed=1)
    gaussian = randn(2048, 32, seed=2)
    fmt, scale, _, errors = search_activation(LayerStats(gaussian, float(gaussian.min()), float(gaussian.max())), w,
                                              ("e4m3fn", "e5m2"), shrink_factors=(1.0, 0.8, 0.6))
    assert fmt == "e4m3fn" and errors["e4m3fn"] < errors["e5m2"]
    # Small values far below a few exactly-representable outliers: e4m3's narrower range flushes them, e5m2 keeps
    # them, and the outliers cost neither format anything.
    g = torch.Generator().manual_seed(3)
    wide = torch.exp(torch.empty(2048, 32).uniform_(-9, -5, generator=g))
    wide = wide * torch.where(randn(2048, 32, seed=4) > 0, 1.0, -1.0)
    wide[::50, 0] = 1000.0
    fmt, _, _, errors = search_activation(LayerStats(wide, float(wide.min()), float(wide.max())), torch.eye(32),
                                          ("e4m3fn", "e5m2"), shrink_factors=(1.0,))
    assert fmt == "e5m2" and errors["e5m2"] < errors["e4m3fn"]


def test_stats_collector_unfolds_convolutions_and_tracks_ranges() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    lin = nn.Linear(5, 2)
    x = randn(2, 3, 6, 6)
    with StatsCollector({"conv": conv, "lin": lin}, rows_per_call=10, seed=0) as collector:
        conv(x)
        lin(randn(7, 5))
        lin(randn(7, 5, seed=9) * 3)
    stats = collector.stats()
    assert stats["conv"].rows.shape == (10, 27)
    assert stats["lin"].rows.shape == (14, 5)
    assert stats["lin"].amax == float(max(randn(7, 5).max(), (randn(7, 5, seed=9) * 3).max()))
    assert not conv._forward_pre_hooks and not lin._forward_pre_hooks


def test_percentile_observer_clips_a_lone_outlier() -> None:
    x = randn(4096, 16, seed=7)
    # One outlier so large that scaling to it (or to 0.3 of it) flushes every ordinary value below e4m3's smallest
    # subnormal, in an input channel the layer ignores, so clipping it costs nothing.
    x[0, 0] = 1e7
    w = randn(8, 16, seed=8)
    w[:, 0] = 0.0
    fmt, scale, _, _ = search_activation(LayerStats(x, float(x.min()), float(x.max())), w,
                                         ("e4m3fn",), shrink_factors=(1.0, 0.5, 0.3))
    assert scale < 10 / 448  # the percentile observer's clipping value (about 3.9), not the outlier's
