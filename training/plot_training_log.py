"""Draw the loss curves of a ``training_log.json`` (from ``train_reference.py``) as a PNG, with Pillow only.

    python training/plot_training_log.py fpq_plugin/reference/weights/training_log.json out.png
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [(200, 60, 60), (50, 120, 200), (60, 160, 80), (150, 80, 180)]


def plot(log: dict, width: int = 360, height: int = 200) -> Image.Image:
    phases = [k for k, v in log.items() if isinstance(v, dict) and "runs" in v]
    canvas = Image.new("RGB", (width * len(phases), height + 30), "white")
    draw = ImageDraw.Draw(canvas)
    for p, phase in enumerate(phases):
        points = [pt for run in log[phase]["runs"] for pt in run["losses"]]
        boundaries = []
        total = 0
        for run in log[phase]["runs"][:-1]:
            total += run["steps"]
            boundaries.append(total)
        if not points:
            continue
        x0, left, top, bottom = p * width, 40, 20, height
        steps = [s for s, _ in points]
        logs = [math.log10(max(v, 1e-8)) for _, v in points]
        lo, hi = min(logs), max(logs)
        span_x, span_y = max(steps) or 1, (hi - lo) or 1.0

        def xy(step: float, value: float) -> tuple[float, float]:
            return (x0 + left + (width - left - 10) * step / span_x, top + (bottom - top) * (hi - value) / span_y)

        draw.rectangle((x0 + left, top, x0 + width - 10, bottom), outline=(180, 180, 180))
        for b in boundaries:  # where a resumed run started
            draw.line([xy(b, hi), xy(b, lo)], fill=(200, 200, 200))
        draw.line([xy(s, v) for s, v in zip(steps, logs)], fill=COLORS[p % len(COLORS)], width=2)
        draw.text((x0 + left, 4), f"{phase}: loss (log10) vs step", fill="black")
        draw.text((x0 + 2, top), f"{10 ** hi:.3g}", fill="black")
        draw.text((x0 + 2, bottom - 10), f"{10 ** lo:.3g}", fill="black")
        draw.text((x0 + width - 60, bottom + 6), f"{max(steps)} steps", fill="black")
    return canvas


def main(argv: list[str]) -> int:
    source, target = Path(argv[0]), Path(argv[1])
    plot(json.loads(source.read_text())).save(target)
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
