"""Draw the model card's sample grid of the shipped ``scenes-t2i`` model (4 x 8 images, PNG), on any device.

    python training/sample_grid.py fpq_plugin/reference/weights/samples_t2i.png

The prompts are the first 32 held-out scenes (the ones ``train_reference.py``'s final check starts with); DDIM 25
steps, classifier-free guidance 5, generator seed 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fpq_plugin.reference.models import load_t2i_pipeline  # noqa: E402
from fpq_plugin.reference.scenes import sample_scenes  # noqa: E402
from training.train_reference import HELD_OUT_SEED  # noqa: E402

ROWS, COLUMNS = 4, 8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--model", type=Path, default=None, help="a scenes-t2i folder (default: the shipped one)")
    args = p.parse_args(argv)
    pipe = load_t2i_pipeline(args.model)
    scenes = sample_scenes(ROWS * COLUMNS, HELD_OUT_SEED + 1)
    images = pipe([s.caption for s in scenes], num_inference_steps=25, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    size = images.shape[-1]
    grid = images.clamp(0, 1).mul(255).round().byte()
    grid = grid.reshape(ROWS, COLUMNS, 3, size, size).permute(0, 3, 1, 4, 2).reshape(ROWS * size, COLUMNS * size, 3)
    Image.fromarray(grid.numpy()).save(args.out)
    print(f"{args.out}: {', '.join(s.caption for s in scenes[:4])}, ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
