"""Metrics of the evaluation harness against independent computations."""

from __future__ import annotations

import math

import torch

from fpq_plugin.evaluation.metrics import frechet_distance, gaussian_fid, psnr, ssim


def test_psnr_matches_definition() -> None:
    torch.manual_seed(0)
    a = torch.rand(3, 3, 16, 16)
    b = (a + 0.01 * torch.randn_like(a)).clamp(0, 1)
    expected = [10 * math.log10(1 / float(((a[i] - b[i]) ** 2).mean())) for i in range(3)]
    assert torch.allclose(psnr(a, b), torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    assert math.isinf(float(psnr(a, a)[0]))


def test_ssim_properties() -> None:
    torch.manual_seed(1)
    a = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    slightly = (a + 0.02 * torch.randn_like(a)).clamp(0, 1)
    very = (a + 0.3 * torch.randn_like(a)).clamp(0, 1)
    s1, s2 = ssim(a, slightly), ssim(a, very)
    assert (s1 < 1).all() and (s2 < s1).all()
    # Symmetric in its arguments.
    assert torch.allclose(ssim(slightly, a), s1)
    # Constant images: SSIM reduces to the luminance term (2 m1 m2 + c1) / (m1^2 + m2^2 + c1).
    x, y = torch.full((1, 3, 16, 16), 0.3), torch.full((1, 3, 16, 16), 0.5)
    c1 = 0.01**2
    expected = (2 * 0.3 * 0.5 + c1) / (0.3**2 + 0.5**2 + c1)
    assert abs(float(ssim(x, y)) - expected) < 1e-7  # x, y hold float32 0.3 and 0.5


def test_frechet_distance_closed_forms() -> None:
    d = 4
    eye = torch.eye(d, dtype=torch.float64)
    mu = torch.zeros(d, dtype=torch.float64)
    # Same Gaussian: 0. Shifted mean only: |dmu|^2. Scaled isotropic covariances: d (s1 - s2)^2.
    assert abs(frechet_distance(mu, eye, mu, eye)) < 1e-9
    assert abs(frechet_distance(mu, eye, mu + 2, eye) - 4 * d) < 1e-9
    assert abs(frechet_distance(mu, 4 * eye, mu, 9 * eye) - d * (2 - 3) ** 2) < 1e-9
    # Non-commuting covariances: compare with the eigen-free formula for 1-D projections summed (diagonal case).
    c1 = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    c2 = torch.diag(torch.tensor([4.0, 1.0, 9.0, 1.0], dtype=torch.float64))
    expected = float(((c1.diag().sqrt() - c2.diag().sqrt()) ** 2).sum())
    assert abs(frechet_distance(mu, c1, mu, c2) - expected) < 1e-9


def test_gaussian_fid_grows_with_shift() -> None:
    torch.manual_seed(2)
    a = torch.randn(500, 8)
    b = torch.randn(500, 8)
    near, far = gaussian_fid(a, b), gaussian_fid(a, b + 1.0)
    assert near < 0.5 and far > 7.0


def test_paired_bootstrap_interval() -> None:
    from fpq_plugin.evaluation.metrics import paired_bootstrap

    same = paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    shifted = paired_bootstrap([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert shifted == {"mean": 1.0, "lo": 1.0, "hi": 1.0}  # a constant offset: no spread at all
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, generator=g)
    noisy = paired_bootstrap((a + 0.1).tolist(), a.tolist())  # a tiny real difference, no noise between pairs
    assert abs(noisy["mean"] - 0.1) < 1e-6 and abs(noisy["hi"] - noisy["lo"]) < 1e-6  # float32 inputs
    b = torch.randn(200, generator=g)
    unpaired = paired_bootstrap(a.tolist(), b.tolist())  # independent: the interval must cover 0 and be wide
    assert unpaired["lo"] < 0 < unpaired["hi"] and unpaired["hi"] - unpaired["lo"] > 0.2
    import pytest

    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0], [1.0, 2.0])
