"""Logit processing shared by the samplers: CFG, temperature, top-k / top-p, sampling."""
from __future__ import annotations

import numbers

import torch


def cfg_combine(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: l_u + s (l_c - l_u)."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


def cfg_scale_at(scale: float, progress: float, schedule: str = "constant") -> float:
    """Guidance scale at progress in (0, 1]: constant, or a linear ramp from 1 (no guidance) to `scale`."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * progress
    raise ValueError(f"cfg schedule must be 'constant' or 'linear', got {schedule!r}")


def check_sampling_args(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                        cfg_scale: float = 1.0, choice_temperature: float = 0.0) -> None:
    """Refuse settings that would silently sample something else: temperature a finite number > 0,
    top_k None or 0 (off) or an integer >= 1 (k > vocab keeps all), top_p None (off) or in (0, 1],
    cfg_scale and MaskGIT's choice_temperature finite numbers >= 0 (a NaN choice temperature
    reveals in arbitrary order; a NaN scale fails steps later)."""
    if not (0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0 (top_k=1 decodes greedily), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"top_k must be None or 0 (off), or an integer >= 1 (keep the k likeliest), got {top_k!r}")
    for name, value in (("cfg_scale", cfg_scale), ("choice_temperature", choice_temperature)):
        if not (isinstance(value, numbers.Real) and 0 <= value < float("inf")):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p must be None (off) or in (0, 1] (keep the smallest set of codes reaching that "
                         f"probability), got {top_p!r}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Scale by 1/temperature and set logits outside top-k / nucleus top-p to -inf. (..., V)

    A tiny temperature can push a row's top logit to inf (softmax -> nan), or round to 0 in the
    logits' dtype; such rows are shifted by their max and divided in float64, so the top logit
    stays 0 and the rest go to -inf (argmax). Other rows are divided as they are, so their bits do
    not change (and only the overflowing rows are copied to float64)."""
    check_sampling_args(temperature, top_k, top_p)
    scaled = logits / temperature
    if temperature < 1:  # only a division by < 1 can overflow
        overflow = ~scaled.amax(-1).isfinite()  # (...)
        if overflow.any():
            rows = logits[overflow]  # (R, V)
            # in float64: a temperature below float32's range would round to 0 there (0 / 0 = nan)
            scaled[overflow] = ((rows - rows.amax(-1, keepdim=True)).double() / temperature).to(logits.dtype)
    logits = scaled
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) > top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One categorical draw per row of (..., V) processed logits -> (...) long."""
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def sample_tokens(model, logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None):
    """Draw codes from model logits (..., sum of head sizes), factorised or not.

    Each sub-token is filtered and sampled independently; returns (codes (...), log p of the drawn
    code (...)), the latter the sum of the sub-token log-probabilities under the logits as given,
    before temperature and top-k / top-p: MaskGIT's confidence ranks positions by what the model
    believes, not by the sampling knobs (under top_k=1 every filtered log p would be 0)."""
    subs, logp = [], 0.0
    for part in model.split_logits(logits):
        s = sample_from_logits(filter_logits(part, temperature, top_k, top_p), generator)
        logp = logp + part.log_softmax(-1).gather(-1, s[..., None]).squeeze(-1)
        subs.append(s)
    return model.join_tokens(torch.stack(subs, -1)), logp
