"""``training/sample_grid.py``: the model card's sample grid from the shipped t2i model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fpq_plugin.reference.models import WEIGHTS_DIR

SCRIPT = Path(__file__).resolve().parents[2] / "training" / "sample_grid.py"


@pytest.mark.skipif(not (WEIGHTS_DIR / "scenes-t2i").is_dir(), reason="the shipped reference weights are missing")
def test_grid_is_4_by_8_images_of_the_shipped_model(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("sample_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "grid.png"
    assert module.main([str(out)]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (4 * 64, 8 * 64, 3)
    tiles = grid.reshape(4, 64, 8, 64, 3).transpose(0, 2, 1, 3, 4).reshape(32, -1)
    assert len({t.tobytes() for t in tiles}) == 32  # 32 different prompts, 32 different images
    assert tiles.std(axis=1).min() > 5  # images, not flat colour fields
