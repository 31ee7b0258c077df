"""Noise-prediction SQNR per timestep of every recipe on random-weight UNets with the real SD1.5 and SDXL configs.

A sanity check at full size (issue 7): the reference models are small, so this shows that every recipe keeps a
real-sized UNet's output close to its float output at every point of the schedule, and how weight sparsity moves
from INT to FP. Random weights compound quantization error through the depth far more than trained weights do, so
the absolute dB are a floor, not a quality estimate; the order of the recipes and the flatness over timesteps are
what to read.

Protocol: one float UNet per config (seeded); calibration on ``--calib-calls`` synthetic calls (classifier-free-
guidance batch of 2, timesteps spread over the schedule, random text embeddings of the real widths, seeds disjoint
from the evaluation's); then for each recipe a fresh copy is quantized and its noise prediction is compared with
the float one at each evaluation timestep on held-out latents. ``--method none`` is round to nearest with the
weight format chosen per layer by weight error and activation scales from the observed range (the core
library's ``quantize_``; minutes on a CPU); ``--method fast|standard`` runs the paper's method (search, learned
rounding; for a GPU).

CPU (committed numbers: ``benchmarks/results/full_size_sqnr_cpu.json``)::

    OMP_NUM_THREADS=2 python benchmarks/full_size_sqnr.py --latent 32 --out benchmarks/results/full_size_sqnr_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fpq_plugin as fpq  # noqa: E402
from fpq_plugin.method import UNetCall, quantize_with_method, recipe_for  # noqa: E402
from fpq_plugin.models.unet_configs import build_unet, example_unet_inputs  # noqa: E402
from fpq_plugin.stats import layer_stats  # noqa: E402

RECIPES = {  # label -> recipe (INT rows use the same per-channel weights and per-tensor activations as FP rows)
    "INT8 W8A8": "int8",
    "FP8 W8A8": "w8a8",
    "INT4 W4A8": "int4",
    "FP4 W4A8": "w4a8",
    "INT4 W4A16": fpq.get_recipe("int4").replace(name="int4-w4a16", activation_format=None),
    "FP4 W4A16": "w4a16",
}
TIMESTEPS = (999, 800, 600, 400, 200, 50)
CALIBRATION_SEED, EVAL_SEED = 1_000, 5_000


def _calls(unet, n: int, latent: int, seed: int, timesteps: list[int]) -> list[dict]:
    calls = []
    for i, t in enumerate(timesteps[:n] if n <= len(timesteps) else timesteps):
        kw = example_unet_inputs(unet, batch=2, height=latent, width=latent, seed=seed + i)
        kw["timestep"] = torch.full((2,), t, device=kw["sample"].device)
        calls.append(kw)
    return calls


def _sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    reference, test = reference.double(), test.double()
    noise = (reference - test).pow(2).mean().clamp_min(1e-30)
    return float(10 * torch.log10(reference.pow(2).mean() / noise))


@torch.no_grad()
def _predict(unet, calls: list[dict]) -> list[torch.Tensor]:
    return [unet(**kw).sample.float().cpu() for kw in calls]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="labels of RECIPES")
    parser.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8); 64 and 128 are native")
    parser.add_argument("--calib-calls", type=int, default=8)
    parser.add_argument("--method", default="none", choices=("none", "fast", "standard"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    spread = [int(999 - i * 999 / max(args.calib_calls - 1, 1)) for i in range(args.calib_calls)]
    results, meta = [], {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__, "command": "python " + " ".join(sys.argv), "timesteps": TIMESTEPS,
        "latent": args.latent, "method": args.method,
    }

    def save() -> None:  # after every row: a run cut short keeps what it finished
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    for config in args.configs:
        t0 = time.perf_counter()
        base = build_unet(config, device=args.device)
        calib = _calls(base, args.calib_calls, args.latent, CALIBRATION_SEED, spread)
        evals = _calls(base, len(TIMESTEPS), args.latent, EVAL_SEED, list(TIMESTEPS))
        reference = _predict(base, evals)
        print(f"{config}: built and ran float in {time.perf_counter() - t0:.0f} s", flush=True)
        for k, label in enumerate(args.recipes):
            unet = copy.deepcopy(base) if args.device == "cuda" else base  # CPU RAM: rebuild instead of copying
            start = time.perf_counter()
            recipe = RECIPES[label]
            if args.method == "none":
                with torch.no_grad():
                    fpq.quantize_(unet, recipe, backend="reference",
                                  calibration_fn=lambda m: [m(**kw) for kw in calib])
            else:
                calls = [UNetCall((), kw, i) for i, kw in enumerate(calib)]
                quantize_with_method(unet, recipe_for(recipe, args.method), calls, method=args.method,
                                     backend="reference")
            seconds = time.perf_counter() - start
            out = _predict(unet, evals)
            stats = layer_stats(unet)
            row = {
                "config": config, "recipe": label, "quantize_s": round(seconds, 1),
                "sqnr_db_per_timestep": {t: round(_sqnr(r, o), 2) for t, r, o in zip(TIMESTEPS, reference, out)},
                "weight_sparsity": stats.sparsity, "weight_MiB": round(stats.total_bytes / 2**20, 1),
            }
            row["sqnr_db_mean"] = round(sum(row["sqnr_db_per_timestep"].values()) / len(TIMESTEPS), 2)
            results.append(row)
            print(json.dumps(row), flush=True)
            save()
            del unet
            gc.collect()
            if args.device != "cuda" and k + 1 < len(args.recipes):
                base = build_unet(config, device=args.device)
        del base
        gc.collect()
    save()
    print(f"\n{'config':6} {'recipe':11} " + " ".join(f"t={t:>4}" for t in TIMESTEPS) + "   mean  sparsity")
    for r in results:
        cells = " ".join(f"{r['sqnr_db_per_timestep'][t]:6.1f}" for t in TIMESTEPS)
        print(f"{r['config']:6} {r['recipe']:11} {cells} {r['sqnr_db_mean']:6.1f} {r['weight_sparsity']:8.2%}")


if __name__ == "__main__":
    main()
