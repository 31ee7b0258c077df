"""Chart of a bench_unet.py result (made here, not on the device: matplotlib is not a dependency).

    python benchmarks/plot_unet.py benchmarks/results/unet_h200_full.json benchmarks/results/unet_h200_full.png

Left: speed-up over bf16 eager per UNet config (eager, CUDA-graph replay and torch.compile bars where measured).
Right: device time per layer type (profiler) for each variant of the largest config.
"""

from __future__ import annotations

import json
import sys


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(src) as fh:
        res = json.load(fh)
    configs = list(res["results"])
    names = [n for n in res["results"][configs[0]]["variants"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(names))
    for i, vn in enumerate(names):
        for j, cfg in enumerate(configs):
            vs = res["results"][cfg]["variants"]
            base = vs["bf16"]
            v = vs.get(vn, {})
            x = j + i * width
            bars = []
            if v.get("eager_ms") and base.get("eager_ms"):
                bars.append(("eager", base["eager_ms"] / v["eager_ms"], 1.0))
            if v.get("graph_ms") and base.get("eager_ms") and base.get("graph_ms"):
                bars.append(("graph", base["graph_ms"] / v["graph_ms"], 0.45))
            if v.get("front_door_ms") and base.get("eager_ms"):  # the CUDA-graph front door vs bf16 eager
                bars.append(("front door", base["eager_ms"] / v["front_door_ms"], 0.7))
            if v.get("compiled_ms") and base.get("eager_ms_same_process"):
                bars.append(("compiled", base["eager_ms_same_process"] / v["compiled_ms"], 0.2))
            for k, (kind, val, alpha) in enumerate(bars):
                ax.bar(x + k * width / len(bars), val, width / len(bars), color=f"C{i}", alpha=alpha,
                       label=vn if (j == 0 and k == 0) else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.3, color="r", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 for j in range(len(configs))], configs)
    ax.set_ylabel("speed-up: eager vs bf16 eager (solid); graph vs graph (light);\n"
                  "front door vs bf16 eager (medium); compiled vs eager (palest)")
    ax.set_title(f"UNet forward, {res.get('device', '')}")
    ax.legend(fontsize=8)
    with_bd = [c for c in configs if any("breakdown" in v for v in res["results"][c]["variants"].values())]
    big = with_bd[-1] if with_bd else configs[-1]
    vs = res["results"][big]["variants"]
    kinds = ("linear_ms", "conv_ms", "attention_ms", "other_ms", "triton_ms_est")  # (the last: older files)
    left = [0.0] * len(names)
    for c, kind in enumerate(kinds):
        vals = [vs.get(vn, {}).get("breakdown", {}).get(kind, 0.0) or 0.0 for vn in names]
        ax2.barh(names, vals, left=left, color=f"C{c}", label=kind.removesuffix("_ms").removesuffix("_ms_est"))
        left = [a + b for a, b in zip(left, vals)]
    ax2.set_xlabel(f"device ms per forward ({big}; profiler; fpq's Triton kernels are in 'other')")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*(sys.argv[1:3] if len(sys.argv) > 2 else ("benchmarks/results/unet_h100.json",
                                                     "benchmarks/results/unet_h100.png")))
