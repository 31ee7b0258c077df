"""Write an evaluation as files: ``report.md`` (tables), ``results.json``, ``grid.png`` and ``plots.png``.

Pictures are drawn with Pillow (a diffusers dependency), so the report needs nothing beyond fpq's own
requirements.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from fpq_plugin.evaluation.harness import EvalResult
from fpq_plugin.evaluation.merge import IMAGES_FILE, RESULTS_FILE, images_to_tensors
from fpq_plugin.evaluation.metrics import paired_bootstrap
from fpq_plugin.io.checkpoint import atomic_write_bytes

__all__ = ["PAIRED", "markdown_table", "paired_differences", "write_report"]

# The claims, as (row, row it should beat): FP4 with learned rounding against INT4 AdaRound at the same
# activation precision, and against FP4 round to nearest. Reported for every pair whose two rows were evaluated.
PAIRED = (
    ("fp4-w4a8-learned", "int4-w4a8-adaround"),
    ("fp4-w4a8-search-learned", "int4-w4a8-adaround"),
    ("fp4-w4a16-learned", "int4-w4a16-adaround"),
    ("fp4-w4a8-learned", "fp4-w4a8-nearest"),
    ("fp4-w4a8-search-learned", "fp4-w4a8-search-nearest"),
    ("fp4-w4a16-learned", "fp4-w4a16-nearest"),
)
_PAIRED_METRICS = (("psnr_db", "PSNR dB", "{:+.2f}"), ("ssim", "SSIM", "{:+.4f}"),
                   ("prompt_accuracy", "prompt acc", "{:+.3f}"))

_COLUMNS = (
    ("label", "variant", "{}"),
    ("psnr_db", "PSNR dB", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("fid_vs_fp", "FID vs FP", "{:.2f}"),
    ("fid_vs_data", "FID vs data", "{:.2f}"),
    ("prompt_accuracy", "prompt acc", "{:.3f}"),
    ("weight_sparsity", "weight sparsity", "{:.2%}"),
    ("weight_bytes", "UNet MiB", "{}"),
    ("quantize_seconds", "quantize s", "{:.0f}"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "weight_bytes":
        return f"{value / 2**20:.2f}"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (columns that no row has are left out)."""
    cols = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in cols) + " |")
    return "\n".join(lines)


def paired_differences(rows: list[dict], pairs=PAIRED) -> list[dict]:
    """For each (a, b) of ``pairs`` with both rows present and scored per image: the mean per-image difference
    a - b of PSNR, SSIM and prompt accuracy with its 95% bootstrap interval (images resampled in pairs)."""
    by_name = {r["variant"]: r for r in rows if "per_image" in r}
    out = []
    for a, b in pairs:
        if a not in by_name or b not in by_name:
            continue
        pa, pb = by_name[a]["per_image"], by_name[b]["per_image"]
        entry: dict = {"a": a, "b": b}
        for key, _, _ in _PAIRED_METRICS:
            if key in pa and key in pb:
                entry[key] = paired_bootstrap(pa[key], pb[key])
        out.append(entry)
    return out


def _paired_table(paired: list[dict]) -> list[str]:
    cols = [c for c in _PAIRED_METRICS if any(c[0] in p for p in paired)]
    lines = ["Paired differences (mean over the same images of row minus compared row, 95% bootstrap interval; an "
             "interval that contains 0 is a difference these images cannot show):", "",
             "| row | compared with | " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for p in paired:
        cells = []
        for key, _, fmt in cols:
            d = p.get(key)
            interval = "-" if d is None else f"[{fmt.format(d['lo'])}, {fmt.format(d['hi'])}]"
            cells.append("-" if d is None else f"{fmt.format(d['mean'])} {interval}")
        lines.append(f"| {p['a']} | {p['b']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(data))


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _grid(result: EvalResult, scale: int):
    from PIL import Image, ImageDraw

    names = list(result.images)
    first = result.images[names[0]]
    n, _, h, w = first.shape
    label_w = 170
    tile_h, tile_w = h * scale, w * scale
    canvas = Image.new("RGB", (label_w + n * tile_w, len(names) * tile_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(names):
        draw.text((4, r * tile_h + tile_h // 2 - 6), name, fill="black")
        for c in range(n):
            array = (result.images[name][c].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (label_w + c * tile_w, r * tile_h))
    return canvas


def _bars(rows: list[dict]):
    """Horizontal bar charts of PSNR, prompt accuracy and weight sparsity, one panel each."""
    from PIL import Image, ImageDraw

    panels = [("psnr_db", "PSNR vs full precision (dB)"), ("prompt_accuracy", "prompt accuracy"),
              ("weight_sparsity", "weight sparsity")]
    panels = [p for p in panels if any(isinstance(r.get(p[0]), float) for r in rows)]
    label_w, bar_w, row_h = 230, 260, 16
    panel_h = 24 + row_h * len(rows)
    canvas = Image.new("RGB", (label_w + bar_w + 60, panel_h * len(panels) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (key, title) in enumerate(panels):
        top = p * panel_h
        draw.text((4, top + 4), title, fill="black")
        values = [r.get(key) for r in rows]
        finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
        top_value = max(finite) if finite else 1.0
        for i, (row, value) in enumerate(zip(rows, values)):
            y = top + 22 + i * row_h
            draw.text((4, y), row["variant"], fill="black")
            if not isinstance(value, float) or not math.isfinite(value):
                draw.text((label_w, y), "-", fill="black")
                continue
            length = int(bar_w * max(0.0, value) / top_value) if top_value > 0 else 0
            draw.rectangle((label_w, y + 2, label_w + length, y + row_h - 3), fill=(70, 110, 200))
            draw.text((label_w + length + 4, y), f"{value:.3g}", fill="black")
    return canvas


def write_report(result: EvalResult, out_dir: str | os.PathLike[str], command: str = "", scale: int = 2) -> Path:
    """Write the report files into ``out_dir`` (created); returns the path of ``report.md``.

    Args:
        result: what :func:`~fpq_plugin.evaluation.evaluate` returned.
        out_dir: output folder.
        command: the command line that made the result, recorded in the report and the JSON.
        scale: pixel magnification of the image grid.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paired = paired_differences(result.rows)
    data = result.to_json() | {"command": command, "paired": paired}
    _write(out / RESULTS_FILE, json.dumps(data, indent=1).encode())
    if result.images:
        _write(out / "grid.png", _png_bytes(_grid(result, scale)))
        # The grid's images in a loadable form, so reports of separate processes merge (fpq eval --jobs/--merge).
        atomic_write_bytes(out / IMAGES_FILE, lambda tmp: save_file(images_to_tensors(result), tmp))
    _write(out / "plots.png", _png_bytes(_bars(result.rows)))
    s = result.settings
    lines = [
        f"# fpq evaluation: `{s.model}` reference model",
        "",
        f"Command: `{command}`" if command else "",
        "",
        f"{s.n_images} images per variant, DDIM {s.steps} steps"
        + (f", guidance {s.guidance_scale}" if s.model == "t2i" else "")
        + f"; calibration: {s.calibration_prompts} runs x {s.calibration_keep_steps} recorded steps, shared by every"
        " variant. PSNR/SSIM/FID are against the full-precision model's images from the same seeds"
        + (" and prompts" if s.model == "t2i" else "")
        + "; FID uses the attribute classifier's 256-d pooled features (`scenes-judge`), 'FID vs data' compares"
        " with freshly drawn scenes. Weight sparsity: exact zeros among the quantized layers' dequantized weights.",
        "",
        markdown_table(result.rows),
        "",
    ]
    if paired:
        lines += _paired_table(paired)
    if any("prompt_accuracy_per_attribute" in r for r in result.rows):
        attrs = list(next(r for r in result.rows if "prompt_accuracy_per_attribute" in r)[
            "prompt_accuracy_per_attribute"])
        lines += ["Prompt accuracy per attribute:", "", "| variant | " + " | ".join(attrs) + " |",
                  "|" + "---|" * (len(attrs) + 1)]
        for r in result.rows:
            per = r.get("prompt_accuracy_per_attribute", {})
            lines.append(f"| {r['variant']} | " + " | ".join(f"{per.get(a, float('nan')):.3f}" for a in attrs) + " |")
        lines.append("")
    lines += (["![grid](grid.png)", ""] if result.images else []) + ["![plots](plots.png)", ""]
    report = out / "report.md"
    _write(report, "\n".join(lines).encode())
    return report

