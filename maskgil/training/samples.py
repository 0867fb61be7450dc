"""Samples for training logs and the quickstart (from class ids or prompts): tokens, then decoded uint8 images."""
from __future__ import annotations

import numpy as np
import torch

from maskgil.images import to_uint8_nhwc
from maskgil.sampling import sample_ar, sample_fusion, sample_maskgit


@torch.no_grad()
def sample_tokens(model, conditions: list, per_condition: int, grid: tuple[int, int], *, cfg_scale: float = 2.0,
                  steps: int = 8, temperature: float = 1.0, top_k: int | None = None,
                  choice_temperature: float = 4.5, ar_model=None, ar_tokens: int = 0, seed: int = 0,
                  batch_size: int = 64, text_encoder=None) -> tuple[torch.Tensor, list]:
    """Tokens (len(conditions) * per_condition, h*w) and the condition of each row, condition-major.

    `conditions` are class ids, or prompts for a text-conditional model (encoded by `text_encoder`,
    a `maskgil.text.TextEncoder`). The sampler follows the model: MaskGIT for masked models, AR for
    causal ones, fusion when `ar_model` and `ar_tokens` > 0 are given (AR writes the first
    ar_tokens, `model` the rest)."""
    rows = [c for c in conditions for _ in range(per_condition)]
    text = model.config.cond == "text"
    if text and text_encoder is None:
        raise ValueError("a text-conditional model needs a text_encoder to sample from prompts")
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        text_mask = None
        if text:
            cond, text_mask = text_encoder.encode(chunk)
            cond, text_mask = cond.to(device), text_mask.to(device)
        else:
            cond = torch.tensor(chunk, dtype=torch.long, device=device)
        if ar_model is not None and ar_tokens > 0:
            t = sample_fusion(ar_model, model, cond, grid, ar_tokens=ar_tokens, mar_steps=steps, cfg_scale=cfg_scale,
                              temperature=temperature, top_k=top_k, choice_temperature=choice_temperature, generator=g,
                              text_mask=text_mask)
        elif model.config.causal:
            t = sample_ar(model, cond, grid, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, generator=g,
                          text_mask=text_mask)
        else:
            t = sample_maskgit(model, cond, grid, steps=steps, cfg_scale=cfg_scale, temperature=temperature,
                               top_k=top_k, choice_temperature=choice_temperature, generator=g, text_mask=text_mask)
        out.append(t.cpu())
    return torch.cat(out), rows


def decode_tokens(tokenizer, tokens: torch.Tensor, grid: tuple[int, int], batch_size: int = 64) -> np.ndarray:
    """(B, h*w) codes -> uint8 images (B, H, W, 3)."""
    imgs = []
    for chunk in tokens.split(batch_size):
        x = tokenizer.decode(chunk.view(-1, grid[0], grid[1]))  # (b, 3, H, W) in [-1, 1]
        imgs.append(to_uint8_nhwc(x))
    return np.concatenate(imgs)
