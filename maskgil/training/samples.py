"""Class-conditional samples for training logs and the quickstart: tokens, then decoded uint8 images."""
from __future__ import annotations

import numpy as np
import torch

from maskgil.images import to_uint8_nhwc
from maskgil.sampling import sample_ar, sample_fusion, sample_maskgit


@torch.no_grad()
def sample_class_tokens(model, classes: list[int], per_class: int, grid: tuple[int, int], *, cfg_scale: float = 2.0,
                        steps: int = 8, temperature: float = 1.0, top_k: int | None = None,
                        choice_temperature: float = 4.5, ar_model=None, ar_tokens: int = 0, seed: int = 0,
                        batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (len(classes) * per_class, h*w) and their labels, class-major order.

    The sampler follows the model: MaskGIT for masked models, AR for causal ones, fusion when
    `ar_model` and `ar_tokens` > 0 are given (AR writes the first ar_tokens, `model` the rest)."""
    labels = torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    for chunk in labels.split(batch_size):
        cond = chunk.to(device)
        if ar_model is not None and ar_tokens > 0:
            t = sample_fusion(ar_model, model, cond, grid, ar_tokens=ar_tokens, mar_steps=steps, cfg_scale=cfg_scale,
                              temperature=temperature, top_k=top_k, choice_temperature=choice_temperature, generator=g)
        elif model.config.causal:
            t = sample_ar(model, cond, grid, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, generator=g)
        else:
            t = sample_maskgit(model, cond, grid, steps=steps, cfg_scale=cfg_scale, temperature=temperature,
                               top_k=top_k, choice_temperature=choice_temperature, generator=g)
        out.append(t.cpu())
    return torch.cat(out), labels


def decode_tokens(tokenizer, tokens: torch.Tensor, grid: tuple[int, int], batch_size: int = 64) -> np.ndarray:
    """(B, h*w) codes -> uint8 images (B, H, W, 3)."""
    imgs = []
    for chunk in tokens.split(batch_size):
        x = tokenizer.decode(chunk.view(-1, grid[0], grid[1]))  # (b, 3, H, W) in [-1, 1]
        imgs.append(to_uint8_nhwc(x))
    return np.concatenate(imgs)
