"""The image batches every metric accepts, in one place.

uint8 in 0..255, or float in [-1, 1] (the project's model range); NCHW tensors or arrays, or NHWC
(what PIL, `make_dataset` and ADM `.npz` batches hold), told apart by which axis has 3 channels.
"""
from __future__ import annotations

import numpy as np
import torch


def as_nchw(images) -> torch.Tensor:
    """An RGB batch as a torch tensor in NCHW, dtype kept; clear errors for anything else."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array of images, got {type(images).__name__}")
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise ValueError(f"expected RGB images as N x 3 x H x W or N x H x W x 3, got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 (0..255) or float in [-1, 1], got {images.dtype}")
    return images


def to_minus_one_one(images) -> torch.Tensor:
    """uint8 or [-1, 1] images, either layout -> float32 NCHW in [-1, 1]; out-of-range floats raise."""
    x = as_nchw(images)
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= -1.001 and hi <= 1.001):  # written so that NaN fails too (it would become black)
            raise ValueError(f"float images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}] "
                             "(uint8 images are taken as 0..255)")
    return x.float().clamp(-1, 1)


def to_uint8_grid(images) -> torch.Tensor:
    """uint8 or [-1, 1] images -> float32 NCHW on the integer grid 0..255 (floats are rounded)."""
    x = as_nchw(images)
    if x.dtype == torch.uint8:
        return x.float()
    return ((to_minus_one_one(x) + 1) * 127.5).round().clamp(0, 255)
