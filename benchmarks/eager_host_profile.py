"""Where an eager UNet forward spends its *host* time: cProfile over a few bf16 and fpq W8A8 forwards on a GPU.

Eager UNet calls on the lent GPUs are host-bound (the device finishes each kernel before the next is launched), so
an fpq layer's Python and launch cost, not its kernel, sets eager latency. This prints, per variant, the host time
per forward and the functions with the most own time, and writes them as JSON.

    python benchmarks/eager_host_profile.py --model sd15 --batch 2 --out benchmarks/results/eager_host_h200.json

``--recipes w8a8,w4a8 --dtype fp16 --inference-mode`` profiles the call as ComfyUI makes it (an fp16 UNet under
``torch.inference_mode``, whose tensors have no version counter). ``--also-off qops.CALL_SITE_LAUNCHES`` adds, for
each recipe, a row with that module-level switch of ``fpq_plugin.kernels`` set to False (same process, same model).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_unet import LATENT, build, call, input_ranges, quantized_copy  # noqa: E402
from profile_summary import summarize  # noqa: E402


def host_profile(variant, inp, calls: int, top: int, inference_mode: bool = False) -> dict:
    if inference_mode:
        with torch.inference_mode():
            return host_profile(variant, inp, calls, top)
    for _ in range(3):
        call(variant, inp)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        call(variant, inp)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / calls
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call(variant, inp)
    torch.cuda.synchronize()
    prof.disable()
    return {"wall_ms_per_forward": round(wall * 1e3, 2), **summarize(prof, calls, top)}


@contextlib.contextmanager
def switched_off(flag: str | None):
    """``fpq_plugin.kernels.<module>.<NAME> = False`` inside (``flag``: ``module.NAME``), restored after."""
    if flag is None:
        yield
        return
    module_name, name = flag.rsplit(".", 1)
    module = importlib.import_module(f"fpq_plugin.kernels.{module_name}")
    old = getattr(module, name)
    setattr(module, name, False)
    try:
        yield
    finally:
        setattr(module, name, old)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/results/eager_host_h200.json")
    ap.add_argument("--recipes", default="w8a8", help="fpq recipes to profile beside the float model")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--inference-mode", action="store_true", help="calls under torch.inference_mode, as ComfyUI")
    ap.add_argument("--also-off", default=None, help="module.SWITCH of fpq_plugin.kernels: extra rows with it False")
    args = ap.parse_args()
    from fpq_plugin.models.unet_configs import example_unet_inputs

    dev = torch.device("cuda")
    base = build(args.model, dev)
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    base = base.to(dtype)
    lat = LATENT[args.model]
    inp = example_unet_inputs(base, batch=args.batch, height=lat, width=lat)
    ranges = input_ranges(base, inp)
    models = [(args.dtype, base, None)]
    for recipe in args.recipes.split(","):
        model = quantized_copy(base, recipe, ranges)[0]
        models.append((f"fpq_{recipe}", model, None))
        if args.also_off:
            models.append((f"fpq_{recipe}_{args.also_off.rsplit('.', 1)[1]}_off", model, args.also_off))
    res = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "dtype": args.dtype, "inference_mode": args.inference_mode, "variants": {}}
    for name, model, flag in models:
        with switched_off(flag):
            res["variants"][name] = host_profile({"name": name, "model": model}, inp, args.calls, args.top,
                                                 args.inference_mode)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    for name, r in res["variants"].items():
        print(f"== {name}: {r['wall_ms_per_forward']} ms per forward (host-bound eager)")
        for row in r["top_own_time"][:18]:
            print(f"  {row['own_ms_per_forward']:8.3f} ms own {row['cum_ms_per_forward']:8.3f} cum "
                  f"{row['calls_per_forward']:7.1f}x  {row['function']}")


if __name__ == "__main__":
    main()
