"""Wall time of the paper's method (W4A8 ``fast`` and ``standard``) on random-weight UNets with real configs.

Run on a GPU (one H100 for the committed numbers)::

    python benchmarks/bench_method.py --configs sd15 sdxl --presets fast standard --out benchmarks/results/method_h100.json

Calibration inputs are synthetic but shaped like a real run: ``--calls`` UNet calls of a classifier-free-guidance
batch (2) at timesteps spread over the schedule, latents at the model's native resolution (SD1.5 64x64, SDXL
128x128), random text embeddings of the real widths. Weights being random changes nothing about the time.
Prints a table last; writes JSON with per-phase times (capture, search, rounding) and peak GPU memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpq_plugin.method import UNetCall, quantize_with_method, recipe_for  # noqa: E402
from fpq_plugin.models.unet_configs import build_unet, example_unet_inputs  # noqa: E402


def synthetic_calls(unet, n_calls: int, seed: int = 0) -> list[UNetCall]:
    calls = []
    for i in range(n_calls):
        kw = example_unet_inputs(unet, batch=2, seed=seed + i)
        t = int(999 - i * (999 / max(n_calls - 1, 1)))
        kw["timestep"] = torch.full((2,), t, device=kw["sample"].device)
        calls.append(UNetCall((), {k: v for k, v in kw.items()}, i).to("cpu"))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--presets", nargs="+", default=["fast", "standard"])
    parser.add_argument("--recipe", default="w4a8")
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = []
    for config in args.configs:
        t0 = time.perf_counter()
        base = build_unet(config, device=device)
        calls = synthetic_calls(base, args.calls)
        print(f"{config}: built in {time.perf_counter() - t0:.1f} s", flush=True)
        for preset in args.presets:
            unet = copy.deepcopy(base)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            report = quantize_with_method(unet, recipe_for(args.recipe, preset), [c.to(device) for c in calls],
                                          method=preset)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            kept = [u.get("kept") for u in report.units if "kept" in u]
            row = {
                "config": config, "recipe": args.recipe, "preset": preset, "calls": args.calls,
                "wall_s": round(wall, 1), "peak_gpu_gib": round(peak, 2) if peak else None,
                "phases_s": {k: round(v, 1) for k, v in report.phases.items()},
                "units": len(report.units), "layers": len(report.layers), "formats": report.format_counts(),
                "learned_kept": kept.count("learned"), "nearest_kept": kept.count("nearest"),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # written after every row, so a run cut short still leaves its finished rows
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({"results": results}, indent=2))
            del unet
            if device == "cuda":
                torch.cuda.empty_cache()
        del base
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "torch": torch.__version__, "command": " ".join(sys.argv)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"{'config':6} {'preset':9} {'wall s':>7} {'capture':>8} {'search':>7} {'rounding':>8} {'peak GiB':>8}")
    for r in results:
        p = r["phases_s"]
        print(f"{r['config']:6} {r['preset']:9} {r['wall_s']:7.1f} {p['capture']:8.1f} {p['search']:7.1f} "
              f"{p['rounding']:8.1f} {str(r['peak_gpu_gib']):>8}")


if __name__ == "__main__":
    main()
