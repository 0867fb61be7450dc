"""Inception Score (Salimans et al., 2016) from classifier logits.

IS = exp(E_x KL(p(y|x) || p(y))), computed on `splits` equal chunks (10 by convention), reported as
mean and standard deviation over chunks. Needs logits, which the offline TorchScript network lacks:
use the torch-fidelity Inception weights (`InceptionFeatureExtractor(weights_path=...)`).
"""
from __future__ import annotations

import numpy as np


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of IS over `splits` chunks of (N, C) logits (N divisible or not: chunks differ by <= 1)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (N, C), got {logits.shape}")
    if len(logits) < splits:
        raise ValueError(f"need at least splits={splits} samples, got {len(logits)}")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))  # log softmax, (N, C)
    scores = []
    for chunk in np.array_split(log_p, splits):
        p = np.exp(chunk)
        log_marginal = np.log(p.mean(axis=0) + 1e-300)  # (C,)
        kl = (p * (chunk - log_marginal)).sum(axis=1)  # (n,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
