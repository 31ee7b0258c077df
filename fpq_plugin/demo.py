"""The bundled end-to-end run: quantize a small Stable Diffusion pipeline and compare it with full precision.

Until the project's trained reference model ships, the pipeline is a tiny SD1.5-architecture pipeline built from
configs with random weights (:mod:`fpq_plugin.models.tiny_pipeline`), so images are structured noise; what the demo
shows is the whole flow (calibrate on prompts through the pipeline's own sampler, quantize, generate with the same
seeds, measure size and closeness) running in seconds on a CPU.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fpq_plugin.api import quantize_, state_bytes
from fpq_plugin.prompts import load_prompts


@dataclass
class DemoRow:
    """One line of the demo table."""

    variant: str
    unet_bytes: int
    ratio_vs_bf16: float
    psnr_db: float
    seconds: float


def psnr_db(reference, other) -> float:
    """PSNR of images in [0, 1] (numpy arrays or tensors)."""
    ref = torch.as_tensor(reference, dtype=torch.float64)
    mse = float((ref - torch.as_tensor(other, dtype=torch.float64)).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _generate(pipe, prompts: list[str], steps: int, seed: int):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, generator=generators, output_type="np").images


def run_demo(
    out_dir: str | Path = "fpq-demo",
    *,
    recipes: tuple[str, ...] = ("w8a8", "w4a8"),
    steps: int = 10,
    n_images: int = 4,
    n_calibration_prompts: int = 8,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[DemoRow], Path]:
    """Quantize the bundled pipeline with each recipe and compare images against full precision.

    Returns:
        The table rows and the path of the side-by-side PNG grid (rows: full precision, then each recipe).
    """
    from fpq_plugin.models.tiny_pipeline import build_tiny_pipeline

    say = progress or (lambda msg: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline("sd15", seed=seed)
    float_unet = pipe.unet
    bf16_bytes = sum(t.numel() * 2 for t in float_unet.state_dict().values())
    prompts = load_prompts(limit=n_images, seed=seed)
    calibration_prompts = load_prompts(limit=n_calibration_prompts, seed=seed + 1)

    say("generating full-precision images")
    start = time.perf_counter()
    reference = _generate(pipe, prompts, steps, seed)
    rows = [DemoRow("full precision (fp32)", state_bytes(float_unet), state_bytes(float_unet) / bf16_bytes, math.inf,
                    time.perf_counter() - start)]
    grids = [reference]

    for name in recipes:
        say(f"calibrating and quantizing {name}")
        start = time.perf_counter()
        unet = copy.deepcopy(float_unet)

        def calibrate(model, _pipe=pipe):
            # The pipeline's own sampler drives the UNet being calibrated, so calibration sees real denoising inputs.
            _pipe.unet = model
            _generate(_pipe, calibration_prompts, steps, seed + 1000)

        quantize_(unet, name, calibration_fn=calibrate)
        pipe.unet = unet
        say(f"generating with {name}")
        images = _generate(pipe, prompts, steps, seed)
        rows.append(DemoRow(name, state_bytes(unet), state_bytes(unet) / bf16_bytes,
                            sum(psnr_db(r, i) for r, i in zip(reference, images)) / len(images),
                            time.perf_counter() - start))
        grids.append(images)
    pipe.unet = float_unet
    grid_path = out_dir / "demo_grid.png"
    _save_grid(grids, grid_path)
    return rows, grid_path


def _save_grid(rows_of_images, path: Path, upscale: int = 4) -> None:
    from PIL import Image

    tiles = torch.stack([torch.as_tensor(im) for row in rows_of_images for im in row])  # (R*C, H, W, 3)
    r, c = len(rows_of_images), len(rows_of_images[0])
    h, w = tiles.shape[1:3]
    grid = tiles.reshape(r, c, h, w, 3).permute(0, 2, 1, 3, 4).reshape(r * h, c * w, 3)
    img = Image.fromarray((grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    img.resize((c * w * upscale, r * h * upscale), Image.NEAREST).save(path)
