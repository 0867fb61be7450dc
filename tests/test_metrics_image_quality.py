import math

import numpy as np
import pytest
import torch

from maskgil.metrics.image_quality import psnr, ssim


def reference_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Wang et al.'s formula with explicit loops over every valid 11x11 window (one CHW image)."""
    r = np.arange(11) - 5.0
    g = np.exp(-r**2 / (2 * 1.5**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(a.shape[0]):
        for i in range(a.shape[1] - 10):
            for j in range(a.shape[2] - 10):
                pa, pb = a[ch, i:i + 11, j:j + 11], b[ch, i:i + 11, j:j + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr_of_known_mse():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01
    b[1, :, :4] += 0.2  # half the pixels off by 0.2: MSE 0.02
    got = psnr(a, b, data_range=2.0)
    assert got[0].item() == pytest.approx(10 * math.log10(4 / 0.01))
    assert got[1].item() == pytest.approx(10 * math.log10(4 / 0.02))
    assert torch.isinf(psnr(a, a, data_range=2.0)).all()


def test_psnr_uint8_matches_closed_form():
    a = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)
    b = torch.full((1, 3, 4, 4), 110, dtype=torch.uint8)  # no uint8 wrap-around: diff done in float
    assert psnr(b, a, data_range=255).item() == pytest.approx(10 * math.log10(255**2 / 100))


def test_ssim_identical_is_one():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(ssim(x, x, data_range=2.0), torch.ones(2, dtype=torch.float64))


def test_ssim_matches_explicit_loop_formula():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, size=(2, 3, 14, 15))
    b = np.clip(a + rng.normal(0, 0.3, size=a.shape), 0, 1)
    got = ssim(torch.from_numpy(a), torch.from_numpy(b), data_range=1.0)
    for k in range(2):
        assert got[k].item() == pytest.approx(reference_ssim(a[k], b[k], 1.0), abs=1e-10)
    # [-1, 1] images (data_range 2) are scored as the same picture on [0, 2].
    got_signed = ssim(torch.from_numpy(2 * a - 1), torch.from_numpy(2 * b - 1), data_range=2.0)
    assert got_signed[0].item() == pytest.approx(reference_ssim(2 * a[0], 2 * b[0], 2.0), abs=1e-10)


def test_ssim_of_constant_images_closed_form():
    # Constant images: variances and covariance are 0, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    m1, m2, dr = 0.2, 0.5, 1.0
    a = torch.full((1, 1, 12, 12), m1, dtype=torch.float64)
    b = torch.full((1, 1, 12, 12), m2, dtype=torch.float64)
    c1 = (0.01 * dr) ** 2
    expected = (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1)
    assert ssim(a, b, data_range=dr).item() == pytest.approx(expected, rel=1e-9)


def test_same_images_in_uint8_and_minus_one_one_give_same_scores():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    y = (x.int() + torch.randint(-20, 21, x.shape)).clamp(0, 255).to(torch.uint8)
    xf, yf = x.double() / 127.5 - 1, y.double() / 127.5 - 1
    assert torch.allclose(ssim(x, y, 255), ssim(xf, yf, 2.0))
    assert torch.allclose(psnr(x, y, 255), psnr(xf, yf, 2.0))


def test_wrong_data_range_is_refused():
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        ssim(x, x, data_range=2.0)
    with pytest.raises(ValueError, match="outside the declared"):
        psnr(x.float(), x.float(), data_range=2.0)  # 0..255 floats scored as if they were [-1, 1]
    with pytest.raises(ValueError, match="outside the declared"):
        ssim(x.float() / 127.5 - 1, x.float() / 127.5 - 1, data_range=1.0)  # [-1, 1] declared as [0, 1]
    assert ssim(x.float() / 255, x.float() / 255, data_range=1.0).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        psnr(x, x[:, :, :8], data_range=255)
    with pytest.raises(ValueError, match="smaller"):
        ssim(x[:, :, :8, :8], x[:, :, :8, :8], data_range=255)
