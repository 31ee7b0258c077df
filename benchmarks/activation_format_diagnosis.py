"""Which side of W8A8 costs the quality on the unconditional reference model: weights or activations, FP8 or INT8.

One UNet call's noise-prediction SQNR (dB) against the float UNet, at three timesteps of the DDIM schedule, for
W8A8 recipes that mix e4m3 / int8 weights with e4m3 / int8 activations (method ``fast``: per-layer search, static
activation scales, round to nearest; calibration on 8 recorded calls of 8 seeds, the same calls for every recipe).
CPU, about a minute; results: ``benchmarks/results/activation_format_diagnosis_cpu.json``::

    python benchmarks/activation_format_diagnosis.py --out benchmarks/results/activation_format_diagnosis_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpq_plugin.evaluation.harness import CALIBRATION_SEED  # noqa: E402
from fpq_plugin.method import quantize_with_method, recipe_for, record_unet_inputs  # noqa: E402
from fpq_plugin.recipes import get_recipe  # noqa: E402
from fpq_plugin.reference.models import load_uncond_pipeline  # noqa: E402

RECIPES = {
    "e4m3 weights, e4m3 activations (w8a8)": get_recipe("w8a8"),
    "e4m3 weights only (w8a16)": get_recipe("w8a16"),
    "int8 weights, int8 activations (int8)": get_recipe("int8"),
    "int8 weights, e4m3 activations": get_recipe("int8").replace(name="int8w-e4m3a", activation_format="e4m3fn"),
    "e4m3 weights, int8 activations": get_recipe("w8a8").replace(name="e4m3w-int8a", activation_format="int8"),
}


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pipe = load_uncond_pipeline()
    with record_unet_inputs(pipe.unet, steps_per_run=20, keep_steps=8) as recorded:
        gens = [torch.Generator().manual_seed(CALIBRATION_SEED + i) for i in range(8)]
        pipe(batch_size=8, num_inference_steps=20, generator=gens, output_type="np")
    calls = list(recorded)
    probes = [calls[i] for i in (0, len(calls) // 2, len(calls) - 1)]
    timesteps = [int(torch.as_tensor(c.args[1]).reshape(-1)[0]) for c in probes]
    with torch.no_grad():
        refs = [pipe.unet(*c.args, **c.kwargs).sample for c in probes]
    rows = {}
    for label, recipe in RECIPES.items():
        unet = copy.deepcopy(pipe.unet)
        quantize_with_method(unet, recipe_for(recipe, "fast"), calls, method="fast", backend="reference")
        with torch.no_grad():
            rows[label] = [round(sqnr_db(r, unet(*c.args, **c.kwargs).sample), 1) for r, c in zip(refs, probes)]
        print(f"{label:40s} " + "  ".join(f"t={t}: {v:5.1f} dB" for t, v in zip(timesteps, rows[label])), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "model": "scenes-uncond",
                                              "timesteps": timesteps, "sqnr_db": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
