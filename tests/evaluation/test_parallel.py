"""`fpq eval --jobs`: how rows are split, and a real two-worker run merged into one report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fpq_plugin.evaluation import ABLATION_VARIANTS, PAPER_VARIANTS
from fpq_plugin.evaluation.parallel import plan_jobs


def test_plan_spreads_learned_rows_and_leaves_no_worker_empty() -> None:
    rows = PAPER_VARIANTS + ABLATION_VARIANTS
    plan = plan_jobs(rows, 4)
    assert len(plan) == 4 and sorted(v.name for group in plan for v in group) == sorted(v.name for v in rows)
    learned = [sum(v.name.endswith(("learned", "adaround")) or v.name.startswith("abl-") for v in g) for g in plan]
    assert max(learned) - min(learned) <= 1  # the expensive rows are balanced
    assert len(plan_jobs(rows[:3], 8)) == 2  # fp32 + two quantized rows: two workers at most
    assert len(plan_jobs(rows, 1)) == 1


@pytest.mark.slow
def test_two_workers_make_one_report(tmp_path) -> None:
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "fpq_plugin.evaluation", "--model", "uncond", "--variants", "fp32,int8-w8a8,fp8-w8a8",
           "--n-images", "2", "--steps", "6", "--calibration-prompts", "1", "--calibration-steps", "1",
           "--batch-size", "2", "--device", "cpu", "--jobs", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "int8-w8a8", "fp8-w8a8"]
    assert (out / "grid.png").is_file() and (out / "parts" / "job-1" / "results.json").is_file()
    # Every worker regenerated the same full-precision images, so the rows are comparable: uncorrelated
    # references would score ~9 dB. (Six steps, not two: a 2-step pixel-space DDIM jumps from t=999, where the
    # x0 estimate divides the noise error by sqrt(alpha_bar) ~ 0.006, so even W8A8 lands ~9 dB from float there.)
    assert rows[0]["psnr_db"] == 99.0 and all(15 < r["psnr_db"] < 99 for r in rows[1:])
