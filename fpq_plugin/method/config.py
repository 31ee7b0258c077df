"""Settings of the paper's method, and the ``fast`` / ``standard`` / ``best`` presets.

Defaults follow the building blocks the paper adopts (see ``shared/research/paper-method.md``): LLM-FP4's joint
format / bias search on the layer-output error, AdaRound's rectified-sigmoid rounding with its regulariser
(lambda 0.01, beta annealed 20 -> 2 after a 20 % warm-up, Adam at 1e-3), BRECQ's block reconstruction with
quantized-model inputs and full-precision targets. The iteration counts are ours: Q-Diffusion's 20k iterations per
block take hours on SD; ``standard`` is sized to finish SD1.5 in minutes on one H100 and ``best`` trades time
for a little more quality.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fpq_plugin.errors import RecipeError

# part of cache keys: bump when results of the same inputs change. 2: step-aware FP rounding on by default.
METHOD_VERSION = "2"


@dataclass(frozen=True)
class MethodConfig:
    """Knobs of calibration, search and learned rounding.

    Args:
        name: preset label.
        search_formats: choose the weight encoding per layer among the recipe's candidates by layer-output error
            (off: the first candidate everywhere; an ablation switch).
        weight_shrink_factors: clipping factors tried per output channel (scale = factor * absmax / format max).
        act_shrink_factors: clipping factors tried for the per-tensor activation scale.
        search_rows: rows (tokens, or conv patches) of each layer's input kept for the searches.
        rounding_iters: learned-rounding iterations per block or layer (0 = round to nearest after the search).
        block_reconstruction: reconstruct whole ResNet / transformer blocks (else every layer on its own).
        lr, reg_weight, beta_start, beta_end, warmup: AdaRound optimisation (see module docstring).
        quantize_acts_during_rounding: keep the static activation quantizers on (straight-through) while learning
            rounding, so the weights adapt to the activation noise they will see.
        step_aware_rounding: FP4DiT's "scale-aware" FP AdaRound, ``h = rect_sigmoid(V / step)`` with ``V`` started
            at ``step * V0``: an element's rounding moves at a rate inversely proportional to its grid step, so
            the many small weights on fine FP steps are trained as hard as the few large ones (INT: step 1, no change).
            On by default since method version 2: +0.5 to +1.4 dB PSNR for FP4 learned rows on the t2i model
            (benchmarks/results/eval/t2i-gauss-v2-fp4-cpu, ...-stepaware-cpu); off: the ``abl-plain-fp-rounding`` row.
        seed: seeds row sampling and mini-batch order; results are deterministic for a seed on one device.
    """

    name: str = "standard"
    search_formats: bool = True
    weight_shrink_factors: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(13))  # 1.0 .. 0.4
    act_shrink_factors: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
    search_rows: int = 4096
    rounding_iters: int = 300
    block_reconstruction: bool = True
    lr: float = 1e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    quantize_acts_during_rounding: bool = True
    step_aware_rounding: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounding_iters < 0 or self.search_rows < 16:
            raise RecipeError(f"method {self.name!r}: rounding_iters must be >= 0 and search_rows >= 16")
        if not 0 <= self.warmup < 1:
            raise RecipeError(f"method {self.name!r}: warmup is a fraction in [0, 1), got {self.warmup}")
        if not self.weight_shrink_factors or not self.act_shrink_factors:
            raise RecipeError(f"method {self.name!r}: shrink factor lists must not be empty")

    def replace(self, **changes) -> MethodConfig:
        return dataclasses.replace(self, **changes)


METHOD_PRESETS: dict[str, MethodConfig] = {
    "fast": MethodConfig("fast", rounding_iters=0, search_rows=2048),
    "standard": MethodConfig("standard"),
    "best": MethodConfig("best", rounding_iters=2000, search_rows=8192),
}


def get_method_config(config: str | MethodConfig) -> MethodConfig:
    if isinstance(config, MethodConfig):
        return config
    try:
        return METHOD_PRESETS[config]
    except (KeyError, TypeError):
        raise RecipeError(f"unknown method preset {config!r}; presets: {', '.join(METHOD_PRESETS)}") from None
