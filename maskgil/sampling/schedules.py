"""Mask schedules shared by training (how many tokens to hide) and MaskGIT decoding.

gamma(r) is the fraction of tokens still masked at progress r in [0, 1]: gamma(0) = 1, gamma(1) = 0.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "arccos", "linear")


def mask_fraction(r, kind: str = "cosine"):
    """gamma(r) for a float or tensor r in [0, 1]."""
    t = torch.as_tensor(r, dtype=torch.float64)
    if kind == "cosine":
        out = torch.cos(t * math.pi / 2)
    elif kind == "arccos":
        out = torch.arccos(t) / (math.pi / 2)
    elif kind == "linear":
        out = 1 - t
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    return out.clamp(0, 1) if isinstance(r, torch.Tensor) else float(out.clamp(0, 1))


def masked_after_steps(n_unknown: int, steps: int, kind: str = "cosine") -> list[int]:
    """How many of the `n_unknown` initially unknown tokens are still masked after each step.

    floor(n * gamma((i+1)/T)), forced strictly decreasing so every step reveals at least one token
    (when steps <= n_unknown) and 0 after the last step."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out, prev = [], n_unknown
    for i in range(steps):
        # + 1e-9: n * (1 - 4/5) is 0.999... in floats; an exact count must not floor to the one below
        m = 0 if i == steps - 1 else math.floor(n_unknown * mask_fraction((i + 1) / steps, kind) + 1e-9)
        m = max(0, min(m, prev - 1)) if prev > 0 else 0
        out.append(m)
        prev = m
    return out


def reveal_counts(n_unknown: int, steps: int, kind: str = "cosine") -> list[int]:
    """Tokens revealed at each step; sums to n_unknown."""
    after = masked_after_steps(n_unknown, steps, kind)
    before = [n_unknown] + after[:-1]
    return [b - a for b, a in zip(before, after)]


def training_mask_counts(batch: int, n_tokens: int, kind: str = "cosine", generator=None, device=None) -> torch.Tensor:
    """Per-sample number of tokens to mask in training: ceil(gamma(r) * N), r ~ U(0, 1), at least 1."""
    r = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    return torch.ceil(mask_fraction(r, kind) * n_tokens).clamp(1, n_tokens).long()
