"""Improved precision and recall (Kynkäänniemi et al., 2019).

Each set's manifold is the union of balls around its points, each ball reaching the point's k-th
nearest neighbour in the same set (k = 3). Precision = share of generated points inside the real
manifold (fidelity); recall = share of real points inside the generated manifold (coverage).

Distances are computed in blocks of `block_size` x `block_size` (4096^2 float32 = 64 MB), so 50k x 50k never exists at once
(a full float32 matrix would be 10 GB); with a GPU, pass `device="cuda"`.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_tensor(x, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"expected features of shape (N, D), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("features contain NaN or inf")
    return t.to(device=device, dtype=torch.float32)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, D), (m, D) -> (n, m) squared Euclidean distances, clamped at 0 against round-off."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0)


def knn_sq_radii(features, k: int = 3, block_size: int = 4096, device="cpu") -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    x = _as_tensor(features, device)
    n = len(x)
    if n <= k:
        raise ValueError(f"need more than k={k} points to find k nearest neighbours, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=x.device)
    for i in range(0, n, block_size):
        rows = x[i:i + block_size]
        # The k+1 smallest per column block, then over the candidates: the self-distance 0 is the first.
        best = torch.cat([_sq_dists(rows, x[j:j + block_size]).topk(min(k + 1, len(x[j:j + block_size])),
                                                                    dim=1, largest=False).values
                          for j in range(0, n, block_size)], dim=1)
        radii[i:i + block_size] = best.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def _coverage(queries: torch.Tensor, points: torch.Tensor, sq_radii: torch.Tensor, block_size: int) -> float:
    """Share of queries that lie inside at least one ball (points[j], radius_j)."""
    inside = torch.zeros(len(queries), dtype=torch.bool, device=queries.device)
    for i in range(0, len(queries), block_size):
        q = queries[i:i + block_size]
        hit = torch.zeros(len(q), dtype=torch.bool, device=q.device)
        for j in range(0, len(points), block_size):
            hit |= (_sq_dists(q, points[j:j + block_size]) <= sq_radii[None, j:j + block_size]).any(dim=1)
        inside[i:i + block_size] = hit
    return int(inside.sum()) / len(inside)


def precision_recall(real_features, gen_features, k: int = 3, block_size: int = 4096, device="cpu") -> dict:
    """{'precision', 'recall'} of generated features against real ones, both (N, D)."""
    real, gen = _as_tensor(real_features, device), _as_tensor(gen_features, device)
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]} vs generated {gen.shape[1]}")
    real_r = knn_sq_radii(real, k, block_size, device)
    gen_r = knn_sq_radii(gen, k, block_size, device)
    return {
        "precision": _coverage(gen, real, real_r, block_size),
        "recall": _coverage(real, gen, gen_r, block_size),
    }
