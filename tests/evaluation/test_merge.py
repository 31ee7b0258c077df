"""Report folders read back and merged: what `fpq eval --jobs` relies on."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fpq_plugin.errors import CheckpointError
from fpq_plugin.evaluation import EvalResult, EvalSettings, write_report
from fpq_plugin.evaluation.merge import IMAGES_FILE, load_result, merge_results

SETTINGS = EvalSettings(model="uncond", n_images=4, steps=3, calibration_prompts=2, device="cpu")


def _result(names: list[str], settings: EvalSettings = SETTINGS, seed: int = 0) -> EvalResult:
    g = torch.Generator().manual_seed(seed)
    rows = [{"variant": n, "label": n.upper(), "psnr_db": 30.0 + i} for i, n in enumerate(names)]
    return EvalResult(settings, rows=rows, images={n: torch.rand(2, 3, 8, 8, generator=g) for n in names})


def test_a_written_report_loads_back(tmp_path) -> None:
    original = _result(["fp32", "fp8-w8a8"])
    write_report(original, tmp_path / "a", command="test")
    loaded = load_result(tmp_path / "a")
    assert loaded.settings == SETTINGS and loaded.rows == original.rows
    for name, images in original.images.items():  # stored as 8-bit pixels
        assert torch.allclose(loaded.images[name], images, atol=0.5 / 255 + 1e-6)


def test_merge_keeps_each_row_once_in_table_order(tmp_path) -> None:
    write_report(_result(["fp32", "fp4-w4a8-learned"]), tmp_path / "job-0")
    write_report(_result(["fp32", "int8-w8a8", "abl-two-timesteps"], seed=1), tmp_path / "job-1")
    parts = [load_result(tmp_path / f"job-{k}") for k in range(2)]
    merged = merge_results(parts, ["job-0", "job-1"])
    assert [r["variant"] for r in merged.rows] == ["fp32", "int8-w8a8", "fp4-w4a8-learned", "abl-two-timesteps"]
    assert list(merged.images) == [r["variant"] for r in merged.rows]
    assert torch.equal(merged.images["fp32"], parts[0].images["fp32"])  # the first copy wins

    path = write_report(merged, tmp_path / "merged")
    rows = json.loads((tmp_path / "merged" / "results.json").read_text())["rows"]
    assert len(rows) == 4 and "INT8-W8A8" in path.read_text()


def test_merging_different_settings_names_the_folder() -> None:
    other = dataclasses.replace(SETTINGS, steps=20)
    with pytest.raises(CheckpointError, match="job-1: evaluated with different settings"):
        merge_results([_result(["fp32"]), _result(["int8-w8a8"], other)], ["job-0", "job-1"])
    with pytest.raises(CheckpointError, match="nothing to merge"):
        merge_results([])


def test_missing_or_corrupt_folders_are_typed_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no results.json"):
        load_result(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not an fpq evaluation result"):
        load_result(tmp_path)
    write_report(_result(["fp32"]), tmp_path / "ok")
    (tmp_path / "ok" / IMAGES_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="images.safetensors: unreadable"):
        load_result(tmp_path / "ok")


def test_report_has_paired_differences_for_the_issue_claims(tmp_path) -> None:
    """Rows scored per image get the paired comparisons of report.PAIRED whose two rows are present."""
    from fpq_plugin.evaluation.report import paired_differences

    result = _result(["fp32", "int4-w4a8-adaround", "fp4-w4a8-learned"])
    g = torch.Generator().manual_seed(3)
    base = torch.rand(16, generator=g) * 5 + 28
    for row, offset in zip(result.rows[1:], (0.0, 0.5)):
        row["per_image"] = {"psnr_db": (base + offset).tolist(), "ssim": [0.9] * 16}
    paired = paired_differences(result.rows)
    assert [(p["a"], p["b"]) for p in paired] == [("fp4-w4a8-learned", "int4-w4a8-adaround")]
    assert abs(paired[0]["psnr_db"]["mean"] - 0.5) < 1e-9 and "prompt_accuracy" not in paired[0]
    report = write_report(result, tmp_path / "rep").read_text()
    assert "| fp4-w4a8-learned | int4-w4a8-adaround | +0.50 [+0.50, +0.50] | +0.0000 [+0.0000, +0.0000] |" in report
    assert json.loads((tmp_path / "rep" / "results.json").read_text())["paired"] == paired
