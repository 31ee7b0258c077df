"""The evaluation harness end to end on the shipped unconditional reference model (small settings)."""

from __future__ import annotations

import json

import pytest
import torch

from fpq_plugin.errors import RecipeError
from fpq_plugin.evaluation import EvalSettings, Variant, evaluate, write_report
from fpq_plugin.evaluation.harness import select_calls
from fpq_plugin.method import MethodConfig
from fpq_plugin.method.capture import UNetCall

# A small search (few rows and clipping factors) keeps the CPU test short; the harness logic is the same.
QUICK = MethodConfig("quick", rounding_iters=0, search_rows=256, weight_shrink_factors=(1.0, 0.8),
                     act_shrink_factors=(1.0, 0.8))


def test_uncond_table_rows_and_report(tmp_path) -> None:
    variants = (
        Variant("fp32", "Full precision", None),
        Variant("fp8-w8a8", "FP8 W8A8", "w8a8", QUICK),
        Variant("int4-w4a8", "INT4 W4A8 nearest", "int4", QUICK),
    )
    settings = EvalSettings(model="uncond", n_images=4, steps=3, calibration_prompts=2, calibration_keep_steps=2,
                            batch_size=4, device="cpu")
    seen: list[int] = []
    result = evaluate(settings, variants, on_row=lambda partial: seen.append(len(partial.rows)))
    assert seen == [1, 2, 3]
    fp, fp8, int4 = result.rows
    assert fp["psnr_db"] == 99.0 and 0 <= fp["fid_vs_fp"] < 1e-3 and fp["ssim"] == pytest.approx(1.0)
    # 8-bit is closer to full precision than 4-bit weights with the same activations format family.
    assert fp8["psnr_db"] > int4["psnr_db"]
    assert fp8["weight_bytes"] < 0.4 * fp["weight_bytes"] and int4["weight_bytes"] < fp8["weight_bytes"]
    assert 0 <= int4["weight_sparsity"] <= 1 and "prompt_accuracy" not in fp8  # unconditional: no prompts
    assert result.images["fp8-w8a8"].shape == (4, 3, 32, 32)

    report = write_report(result, tmp_path / "rep", command="test")
    assert "FP8 W8A8" in report.read_text()
    data = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["fp32", "fp8-w8a8", "int4-w4a8"]
    assert (tmp_path / "rep" / "grid.png").stat().st_size > 0 and (tmp_path / "rep" / "plots.png").is_file()


def test_select_calls_subsets_runs_and_steps() -> None:
    # 4 runs x 4 kept steps, in recording order.
    calls = [UNetCall((torch.zeros(1),), {}, step) for _run in range(4) for step in (0, 3, 6, 9)]
    assert len(select_calls(calls, 4, 1.0, None)) == 16
    quarter = select_calls(calls, 4, 0.25, None)
    assert len(quarter) == 4
    two = select_calls(calls, 4, 1.0, 2)
    assert sorted({c.step for c in two}) == [0, 9] and len(two) == 8


def test_bad_settings_are_typed_errors() -> None:
    with pytest.raises(RecipeError, match="unknown evaluation model"):
        EvalSettings(model="sdxl")
    with pytest.raises(RecipeError, match="n_images"):
        EvalSettings(n_images=1)
