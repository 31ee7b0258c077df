"""How much learned rounding lowers each reconstruction unit's output error, per recipe, on the shipped t2i UNet.

The method reports, for every unit (ResNet / transformer block or leftover layer), the unit-output MSE with the
weights rounded to nearest and after learned rounding (the smaller is kept). Summed over the units, this separates
"learned rounding works as well on the FP grid as on the INT grid" from end-to-end effects between units.

CPU, about 6 minutes per recipe on two cores (4 calibration prompts x 4 kept steps, 300 iterations per unit)::

    python benchmarks/rounding_gain.py --recipes int4,w4a8,w4a8-search --out benchmarks/results/rounding_gain_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpq_plugin.method import capture_pipeline_inputs, get_method_config, quantize_with_method, recipe_for  # noqa: E402
from fpq_plugin.reference.models import load_t2i_pipeline  # noqa: E402

PROMPTS = (
    "a large red circle on the left on a white background",
    "three small cyan squares, black background",
    "large yellow triangle on the right, gray background",
    "two small green rings, beige background",
)


def _override(item: str) -> tuple[str, object]:
    field, _, value = item.partition("=")
    parsed = {"true": True, "false": False}.get(value.lower())
    if parsed is None:
        parsed = float(value) if any(c in value for c in ".e") else int(value)
    return field, parsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="int4,w4a8,w4a8-search")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a MethodConfig field, e.g. --set lr=0.01 --set step_aware_rounding=true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pipe = load_t2i_pipeline()
    calls = capture_pipeline_inputs(pipe, list(PROMPTS), num_inference_steps=20, keep_steps=4)
    config = get_method_config("standard").replace(rounding_iters=args.iters, **dict(map(_override, args.set)))
    rows = {}
    for name in args.recipes.split(","):
        start = time.perf_counter()
        report = quantize_with_method(copy.deepcopy(pipe.unet), recipe_for(name, config), calls, method=config,
                                      backend="reference")  # fmt: skip
        nearest = sum(u["nearest"] for u in report.units)
        kept = sum(min(u["learned"], u["nearest"]) for u in report.units)
        rows[name] = {"nearest": round(nearest, 3), "learned": round(kept, 3), "ratio": round(kept / nearest, 4),
                      "units": len(report.units), "units_kept_learned": sum(u["learned"] <= u["nearest"]
                                                                            for u in report.units),
                      "formats": report.format_counts(), "seconds": round(time.perf_counter() - start, 1)}
        print(name, rows[name], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "config": config.__dict__, "rows": rows},
                                             indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
