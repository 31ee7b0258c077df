"""``training/train_reference.py`` end to end on the CPU with a few steps (a smoke test of its options; the real
runs are on a GPU, see the model card)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from fpq_plugin.reference.models import WEIGHTS_DIR, load_t2i_pipeline

SCRIPT = Path(__file__).resolve().parents[2] / "training" / "train_reference.py"


def _train_reference():
    spec = importlib.util.spec_from_file_location("train_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _excess_kurtosis(w: torch.Tensor) -> float:
    w = w.detach().flatten().double()
    z = (w - w.mean()) / w.std()
    return float((z**4).mean() - 3)


@pytest.mark.skipif(not (WEIGHTS_DIR / "scenes-t2i").is_dir(), reason="the shipped reference weights are missing")
def test_fresh_gaussian_t2i_unet_from_the_shipped_models(tmp_path) -> None:
    # Resume from a copy of the shipped models without the old t2i UNet: a new UNet must not need it (a GPU call
    # that carries ComfyUI too has no room for it).
    resume = tmp_path / "shipped"
    shutil.copytree(WEIGHTS_DIR, resume, ignore=shutil.ignore_patterns("scenes-uncond"))
    shutil.rmtree(resume / "scenes-t2i" / "unet")
    out = tmp_path / "run"
    code = _train_reference().main([
        "--out", str(out), "--resume", str(resume), "--phases", "t2i", "--fresh", "t2i-unet",
        "--unet-init", "gaussian", "--max-steps", "2", "--batch", "4", "--check-n", "2", "--check-steps", "2",
    ])  # fmt: skip
    assert code == 0
    log = json.loads((out / "training_log.json").read_text())
    assert log["t2i_unet_init"] == "gaussian" and [r["steps"] for r in log["t2i"]["runs"]] == [2]
    trained, shipped = load_t2i_pipeline(out / "scenes-t2i"), load_t2i_pipeline(WEIGHTS_DIR / "scenes-t2i")
    # The UNet is new and bell-shaped (2 steps barely move it); the VAE continues from the shipped one.
    kurtosis = [_excess_kurtosis(m.weight) for m in trained.unet.modules() if isinstance(m, torch.nn.Linear)]
    assert abs(sorted(kurtosis)[len(kurtosis) // 2]) < 0.3, kurtosis
    vae_a, vae_b = trained.vae.state_dict(), shipped.vae.state_dict()
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_b)


def test_unet_init_without_a_new_unet_is_refused(tmp_path) -> None:
    with pytest.raises(SystemExit):
        _train_reference().main(["--out", str(tmp_path), "--resume", str(WEIGHTS_DIR), "--phases", "t2i",
                                 "--unet-init", "gaussian"])  # fmt: skip
