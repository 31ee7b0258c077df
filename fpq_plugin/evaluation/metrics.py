"""Image-set metrics of the paper's revised protocol: quantized outputs against full-precision outputs.

All functions take image batches ``(n, 3, h, w)`` in [0, 1] (float tensors) and return Python floats or float64
tensors. PSNR and SSIM compare image ``i`` of one set with image ``i`` of the other (same seed and prompt); FID
compares the two sets' feature distributions; prompt accuracy asks the attribute classifier whether each image shows
what its prompt names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["frechet_distance", "gaussian_fid", "paired_bootstrap", "psnr", "ssim"]


def psnr(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (``inf`` for identical images), float64, shape ``(n,)``."""
    mse = (reference.double() - other.double()).pow(2).flatten(1).mean(dim=1)
    return torch.where(mse == 0, torch.full_like(mse, math.inf), 10 * torch.log10(1.0 / mse))


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()


def ssim(reference: torch.Tensor, other: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian window, K1 0.01, K2 0.03, data range 1), mean over the three
    channels and all valid window positions; float64, shape ``(n,)``.

    The window is 7 rather than the usual 11 because the reference images are 32-64 pixels wide.
    """
    x, y = reference.double(), other.double()
    w = _gaussian_window(window, sigma, x.device)
    c1, c2 = 0.01**2, 0.03**2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=3)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet distance between two Gaussians: ``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)``.

    Computed in float64 through symmetric eigendecompositions (no scipy): ``tr((C1 C2)^1/2)`` equals the trace of
    the square root of the symmetric PSD matrix ``C1^1/2 C2 C1^1/2``, whose eigenvalues are clamped at 0 against
    rounding.
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    vals1, vecs1 = torch.linalg.eigh(cov1)
    sqrt1 = (vecs1 * vals1.clamp_min(0).sqrt()) @ vecs1.T
    middle = sqrt1 @ cov2 @ sqrt1
    covmean_trace = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = float((mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * covmean_trace)
    # The trace terms cancel for (nearly) equal Gaussians; with rank-deficient covariances (fewer images than
    # feature dimensions) the square roots of tiny eigenvalues leave ~1e-5 of rounding, sometimes negative.
    return max(0.0, distance)


def gaussian_fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two feature sets ``(n, d)`` (each fitted with a Gaussian: mean and unbiased covariance).

    With fewer samples than dimensions the covariances are rank-deficient; the number is still a consistent
    comparison between variants evaluated on the same number of images, not comparable across sizes.
    """
    a, b = features_a.double(), features_b.double()
    return frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Mean of ``a[i] - b[i]`` over paired samples (the same seed and prompt) and its 95% percentile bootstrap
    interval: whether two variants scored on the same images differ by more than the choice of images explains.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples need two equally long, non-empty lists (got {len(a)} and {len(b)})")
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(diff), (n_boot, len(diff)), generator=gen)
    means = diff[idx].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": float(diff.mean()), "lo": lo, "hi": hi}
