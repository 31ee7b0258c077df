"""Which 4-bit (and 8-bit) grid represents a weight best depends on the weight's distribution: measured.

The paper's "FP beats INT at equal bits" rests on weights being bell-shaped (a Gaussian or heavier tails: excess
kurtosis >= 0). fpq's reference models are small and briefly trained, and their weights are still close to their
uniform initialisation (this script prints their per-channel excess kurtosis), so on them the format search picks
e1m2 (an evenly spaced FP4 grid) and INT4 with a zero point comes out ahead. This script separates the two effects:
for weight matrices of one shape drawn from distributions from uniform to heavy-tailed, and for the trained
``scenes-t2i`` UNet's own weights, it reports the weight SQNR (dB) of each 4-bit / 8-bit grid with per-channel
MSE-searched scales (INT: asymmetric with a zero point, as in Q-Diffusion), and which FP4 encoding the data-free
search picks. Round to nearest, no calibration data: the grids alone.

CPU, about three minutes on two cores (results: ``benchmarks/results/weight_distribution_sqnr_cpu.json``)::

    python benchmarks/weight_distribution_sqnr.py --out benchmarks/results/weight_distribution_sqnr_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpq_plugin.quantizers import quantize_weight  # noqa: E402
from fpq_plugin.quantizers.weights import choose_weight_format  # noqa: E402

GRIDS = ("int4", "e2m1", "e3m0", "e1m2", "int8", "e4m3fn")
FP4 = ("e2m1", "e3m0", "e1m2")


def excess_kurtosis(w: torch.Tensor) -> float:
    """Median over rows of the excess kurtosis (uniform -1.2, Gaussian 0, Laplace 3)."""
    c = w - w.mean(dim=1, keepdim=True)
    return float((c.pow(4).mean(1) / c.pow(2).mean(1).pow(2) - 3).median())


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum()))


def synthetic(kind: str, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    n, k = shape
    if kind == "uniform":
        return torch.rand(n, k, generator=g) * 2 - 1
    if kind == "gaussian":
        return torch.randn(n, k, generator=g)
    if kind == "laplace":
        u = torch.rand(n, k, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    if kind.startswith("student_t"):  # student_t<nu>: Gaussian / sqrt(chi2_nu / nu)
        nu = int(kind.removeprefix("student_t"))
        chi2 = torch.randn(nu, n, k, generator=g).pow(2).sum(0)
        return torch.randn(n, k, generator=g) / (chi2 / nu).sqrt()
    raise ValueError(kind)


def measure(w: torch.Tensor) -> dict:
    row = {"kurtosis": round(excess_kurtosis(w), 2)}
    for grid in GRIDS:
        row[grid] = round(sqnr_db(w, quantize_weight(w, grid, scale_method="mse").dequantize()), 2)
    row["fp4_searched"] = choose_weight_format(w, FP4, scale_method="mse").format.name
    return row


def trained_layers() -> dict:
    """Element-weighted mean SQNR per grid over every Linear/Conv2d weight of the shipped scenes-t2i UNet."""
    from fpq_plugin.reference.models import load_t2i_pipeline

    unet = load_t2i_pipeline().unet
    totals: dict = {g: 0.0 for g in GRIDS}
    picks: dict[str, int] = {}
    kurt, count = [], 0
    for module in unet.modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = module.weight.detach().float().reshape(module.weight.shape[0], -1)
        row = measure(w)
        for g in GRIDS:
            totals[g] += row[g] * w.numel()
        picks[row["fp4_searched"]] = picks.get(row["fp4_searched"], 0) + 1
        kurt.append(row["kurtosis"])
        count += w.numel()
    out = {g: round(totals[g] / count, 2) for g in GRIDS}
    out["kurtosis"] = round(float(torch.tensor(kurt).median()), 2)
    out["fp4_searched"] = picks
    out["layers"] = len(kurt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shape", default="640x640", help="rows x columns of the synthetic matrices")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    rows = {kind: measure(synthetic(kind, shape, g))
            for kind in ("uniform", "gaussian", "student_t8", "laplace", "student_t4")}
    rows["scenes-t2i UNet (trained)"] = trained_layers()
    result = {"command": " ".join(sys.argv), "shape": list(shape), "grids": list(GRIDS),
              "what": "weight SQNR (dB), per-channel MSE-searched scale, round to nearest; INT asymmetric",
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'weights':28s} {'kurtosis':>8s} " + " ".join(f"{g:>7s}" for g in GRIDS) + "  FP4 search picks")
    for name, r in rows.items():
        print(f"{name:28s} {r['kurtosis']:8.2f} " + " ".join(f"{r[g]:7.2f}" for g in GRIDS) + f"  {r['fp4_searched']}")


if __name__ == "__main__":
    main()
