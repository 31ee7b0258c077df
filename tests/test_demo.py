"""``fpq demo`` on the shipped reference model, with small settings."""

from __future__ import annotations

from fpq_plugin.demo import run_demo
from fpq_plugin.method import MethodConfig

# Same flow as `fpq demo` with a smaller search and 10 rounding iterations, so the CPU test takes seconds, not minutes.
_SMALL = {"search_rows": 256, "weight_shrink_factors": (1.0, 0.8), "act_shrink_factors": (1.0, 0.8)}
QUICK = {"w8a8": MethodConfig("quick-8", rounding_iters=0, **_SMALL),
         "w4a8": MethodConfig("quick-4", rounding_iters=10, **_SMALL)}


def test_demo_rows_and_grid(tmp_path) -> None:
    messages: list[str] = []
    rows, grid = run_demo(tmp_path, steps=3, n_images=2, n_calibration_prompts=2, progress=messages.append,
                          methods=QUICK)
    assert [r.variant for r in rows] == ["full precision (fp32)", "w8a8", "w4a8"]
    fp, w8, w4 = rows
    assert fp.psnr_db == float("inf") and 0 <= fp.prompt_accuracy <= 1
    assert 0.45 < w8.ratio_vs_bf16 < 0.55 and 0.2 < w4.ratio_vs_bf16 < 0.3  # of the UNet's bf16 bytes
    assert w8.psnr_db > w4.psnr_db > 10
    assert w4.sparsity > w8.sparsity >= 0  # coarse 4-bit grids send more small weights to exactly zero
    assert any("learned rounding" in m for m in messages)
    assert grid.is_file() and grid.stat().st_size > 0
