"""Decoded images on their way out: uint8 NHWC batches, one tiled grid, PNG files and bytes.

Every place that shows or ships samples (training logs, the quickstart, evaluation, Serve) goes
through these, so a grid looks the same and a pixel is quantised the same everywhere."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np


def to_uint8_nhwc(images) -> np.ndarray:
    """Images in [-1, 1] (decoder output, NCHW or NHWC) or uint8 -> uint8 (B, H, W, 3).

    Rounded on the 0..255 grid exactly as the metrics quantise (`to_uint8_grid`); floats outside
    [-1, 1] raise instead of being clipped silently."""
    import torch

    from maskgil.metrics.images import to_uint8_grid

    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
    return to_uint8_grid(images).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 (B, H, W, 3) images row-major into one image with `pad`-pixel white gutters and
    border; `ncol` defaults to ceil(sqrt(B)). Shape (rows*(H+pad)+pad, ncol*(W+pad)+pad, 3)."""
    B, H, W, C = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(B)))
    rows = max(1, -(-B // ncol))
    canvas = np.full((rows * (H + pad) + pad, ncol * (W + pad) + pad, C), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        canvas[y:y + H, x:x + W] = img
    return canvas


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> the bytes of a PNG file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write uint8 (H, W, 3) as a PNG, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
    return path
