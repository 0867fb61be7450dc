"""Reconstruction metrics: PSNR and SSIM with an explicit, checked data range.

The data range L is the span of values a pixel can take, and the value range is [low, low + L]:
uint8 images are [0, 255] (L = 255), float images with L = 2.0 are the project's [-1, 1], other
float images are [0, L] (e.g. [0, 1]); pass `low` to say otherwise. Getting L wrong silently
changes the numbers (L = 2.0 on 0..255 pixels makes SSIM's stabilising constants ~16,000x too
small and PSNR ~42 dB too low), so values outside the declared range raise instead.

SSIM's luminance term is not shift-invariant, so images are moved to [0, L] before scoring: the
same picture gives the same SSIM as uint8 with L = 255 and as [-1, 1] floats with L = 2.

Both take batches in NCHW (or a single CHW image), compute in float64 and return one value per
image (shape (N,)); average them yourself over a dataset.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_batch(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected NCHW or CHW images, got shape {tuple(x.shape)}")
    return x


def _check_pair(a, b, data_range: float, low: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and return both batches in float64, shifted to [0, data_range]."""
    a, b = _as_batch(a, "a"), _as_batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    if not (isinstance(data_range, (int, float)) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    if a.dtype != b.dtype:
        raise ValueError(f"dtype mismatch: a {a.dtype} vs b {b.dtype}")
    if a.dtype == torch.uint8:
        if data_range != 255 or low not in (None, 0):
            raise ValueError(f"uint8 images span 0..255, so data_range must be 255 (got {data_range}, low {low})")
        low = 0.0
    elif low is None:
        low = -1.0 if data_range == 2 else 0.0
    hi = low + data_range
    tol = 1e-6 * data_range
    for name, x in (("a", a), ("b", b)):
        if x.numel() and (float(x.min()) < low - tol or float(x.max()) > hi + tol):
            raise ValueError(
                f"{name} has values in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside the declared "
                f"[{low:g}, {hi:g}] (data_range={data_range}): use 2.0 for [-1, 1], 1.0 for [0, 1], 255 for 0..255"
            )
    return a.to(torch.float64) - low, b.to(torch.float64) - low


def psnr(a, b, data_range: float, low: float | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB: 10 log10(data_range^2 / MSE). Identical -> inf."""
    a, b = _check_pair(a, b, data_range, low)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)  # (N,)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_taps(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1D Gaussian (size,), float64; its outer product is the 2D window of Wang et al. (2004)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a, b, data_range: float, low: float | None = None, window_size: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004).

    Local statistics under an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, computed
    per channel on 'valid' positions only (no padding), then averaged over positions and channels.
    """
    a, b = _check_pair(a, b, data_range, low)
    n, c, h, w = a.shape
    if h < window_size or w < window_size:
        raise ValueError(f"images of {h}x{w} are smaller than the {window_size}x{window_size} SSIM window")
    g = gaussian_taps(window_size, sigma).to(a.device)

    def blur(x):  # (N, C, H, W) -> (N, C, H-10, W-10): the 2D Gaussian at valid positions, as rows then columns
        y = F.conv2d(x.reshape(n * c, 1, *x.shape[-2:]), g.view(1, 1, 1, -1))  # (separable: 2x11 taps, not 121)
        y = F.conv2d(y, g.view(1, 1, -1, 1))
        return y.reshape(n, c, *y.shape[-2:])

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov_ab = blur(a * b) - mu_a * mu_b
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(dim=1)  # (N,)

