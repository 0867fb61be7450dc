"""The one interface every image tokenizer implements: images <-> (B, h, w) integer codes.

Subclasses implement three hooks (`encode_to_codes`, `decode_from_codes`, `forward`); this base
class owns input validation, no-grad/eval handling and the checkpoint directory format
(maskgil.checkpoint).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from maskgil.checkpoint import load_pretrained, save_pretrained
from maskgil.precision import CONV_MEMORY_FORMAT


def to_model_input(images: Any) -> torch.Tensor:
    """uint8 (B,H,W,3)/(B,3,H,W) or float (B,3,H,W) in [-1,1] -> float32 (B,3,H,W) in [-1,1].

    Raises ValueError naming the problem for anything else (wrong rank, channel count, range).
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor or numpy.ndarray, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D (B,H,W,3) or (B,3,H,W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        if images.shape[1] == 3:
            x = images
        elif images.shape[-1] == 3:
            x = images.permute(0, 3, 1, 2)
        else:
            raise ValueError(f"uint8 images need 3 channels first or last, got shape {tuple(images.shape)}")
        return x.float().div(127.5).sub(1.0).contiguous()
    if images.is_floating_point():
        if images.shape[1] != 3:
            raise ValueError(f"float images must be (B,3,H,W) in [-1,1], got shape {tuple(images.shape)}")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1.01 or hi > 1.01:
            raise ValueError(f"float images must lie in [-1,1], got values in [{lo:.3g}, {hi:.3g}] "
                             "(pass uint8 for 0..255 data)")
        return images.float()
    raise ValueError(f"images must be uint8 or floating point, got dtype {images.dtype}")


class ImageTokenizer(nn.Module):
    """Base class: `encode(images) -> (B,h,w) long`, `decode(codes) -> (B,3,H,W) float in [-1,1]`.

    Subclasses set `codebook_size`, `downsample`, `embed_dim` and implement:
      `encode_to_codes(x: float (B,3,H,W)) -> long (B,h,w)`,
      `decode_from_codes(codes: long (B,h,w)) -> float (B,3,H,W)`,
      `forward(x, code_noise=0.0) -> (reconstruction, losses: dict[str, Tensor], codes)` for training
      (`code_noise`: see `corrupt_latents`; the losses and codes stay those of the clean codes).
    """

    config_class: type
    codebook_size: int
    downsample: int
    embed_dim: int

    def check_image_size(self, height: int, width: int) -> None:
        d = self.downsample
        if height % d or width % d:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the tokenizer's downsample factor {d}; "
                f"crop or resize it (e.g. centre crop to {height // d * d}x{width // d * d})"
            )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def corrupt_latents(self, z_q: torch.Tensor, p: float) -> torch.Tensor:
        """Decoder-side code noise for training: each position's code vector z_q (B, D, h, w) is
        replaced, with probability p, by the vector of a uniformly random code (no gradient flows
        into it). A generator's wrong tokens reach the decoder the same way; a decoder trained on
        them keeps the object's shape instead of spreading the error."""
        if p <= 0:
            return z_q
        B, _, h, w = z_q.shape
        hit = torch.rand(B, 1, h, w, device=z_q.device) < p  # (B, 1, h, w)
        random = self.quantize.embed(torch.randint(0, self.codebook_size, (B, h, w), device=z_q.device))
        return torch.where(hit, random.detach().to(z_q.dtype), z_q)

    def _eval_no_grad(self, fn, *args):
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn(*args)
        finally:
            self.train(was_training)

    def encode(self, images: Any) -> torch.Tensor:
        """Images -> codes (B, H/downsample, W/downsample), int64, on the model's device."""
        x = to_model_input(images)
        self.check_image_size(x.shape[-2], x.shape[-1])
        return self._eval_no_grad(self.encode_to_codes, x.to(self.device))

    def decode(self, codes: Any) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, h*downsample, w*downsample), float in [-1, 1]."""
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(codes.astype(np.int64))
        if not isinstance(codes, torch.Tensor) or codes.ndim != 3:
            raise ValueError(f"codes must be a (B,h,w) integer tensor, got {getattr(codes, 'shape', type(codes))}")
        if codes.is_floating_point():
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        out = self._eval_no_grad(self.decode_from_codes, codes.long().to(self.device))
        return out.clamp(-1.0, 1.0).contiguous()  # (channels-last weights give channels-last images)

    def reconstruct(self, images: Any) -> torch.Tensor:
        """decode(encode(images)): float (B,3,H,W) in [-1,1]."""
        return self.decode(self.encode(images))

    # -- checkpoints -------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        return save_pretrained(self, path, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "ImageTokenizer":
        return load_tokenizer(path, map_location)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def load_tokenizer(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ImageTokenizer:
    """Load a tokenizer checkpoint directory (config.json + model.safetensors), strictly by key and shape."""
    tok = load_pretrained(path, map_location=map_location, expected_type=ImageTokenizer)
    return tok.to(memory_format=CONV_MEMORY_FORMAT)
