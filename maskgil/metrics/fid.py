"""Fréchet Inception Distance: streaming feature statistics, the distance, reference batches.

`FeatureStats` accumulates the mean and covariance of feature vectors batch by batch in float64
(Chan et al.'s pairwise update, so 50k x 2048 features never need to be held at once), merges
across Ray workers, and saves to `.npz` with `mu`, `sigma`, `num` and the name of the feature
network, so two statistics from different networks are never compared by accident.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

# The feature network behind the precomputed mu/sigma of the ADM reference batches: the TF graph
# of Inception-v3 (2015-12-05), pool_3, run by guided-diffusion's evaluator.
ADM_FEATURE_NETWORK = "tf-inception-2015-12-05/pool_3 (ADM evaluator)"
# What the names of our feature networks say when they are PyTorch ports of that same graph.
TF_INCEPTION_GRAPH = "Inception-v3 2015-12-05 pool3"


def comparable_networks(a: str, b: str) -> bool:
    """Whether features of networks `a` and `b` may be compared: the same network, or ADM's TF graph
    and a port of that graph (fid-helper's TorchScript, the standard torch-fidelity weights file).
    A port's features match the graph's up to its numerical differences, not bit for bit."""
    if a == b:
        return True
    other = b if a == ADM_FEATURE_NETWORK else a if b == ADM_FEATURE_NETWORK else None
    return other is not None and TF_INCEPTION_GRAPH in other and "NOT the standard file" not in other


class FeatureStats:
    """Running mean / covariance of D-dimensional features, float64, mergeable."""

    def __init__(self, dim: int, feature_network: str = "unknown"):
        self.dim = int(dim)
        self.feature_network = feature_network
        self.num = 0
        self._mean = np.zeros(self.dim, dtype=np.float64)
        self._m2 = np.zeros((self.dim, self.dim), dtype=np.float64)  # sum of centred outer products
        self._fixed_sigma: np.ndarray | None = None  # set only by from_moments with an unknown count

    @classmethod
    def from_features(cls, features, feature_network: str = "unknown") -> "FeatureStats":
        features = np.asarray(features)
        stats = cls(features.shape[1], feature_network)
        stats.update(features)
        return stats

    def update(self, features) -> "FeatureStats":
        """Add a batch of features (N, D)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        if len(x) == 0:
            return self
        mean = x.mean(axis=0)
        centred = x - mean
        self._combine(len(x), mean, centred.T @ centred)
        return self

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if self._fixed_sigma is not None:
            raise ValueError("these statistics were loaded without a sample count and cannot be updated or merged")
        n_a = self.num
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.num = n

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Fold `other` (e.g. another worker's statistics) into self; returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        if other.feature_network != self.feature_network:
            raise ValueError(f"cannot merge statistics from {other.feature_network!r} into {self.feature_network!r}")
        if other._fixed_sigma is not None:
            raise ValueError("cannot merge statistics loaded without a sample count")
        if other.num:
            self._combine(other.num, other._mean, other._m2)
        return self

    @property
    def mu(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (divides by N - 1, like np.cov)."""
        if self._fixed_sigma is not None:
            return self._fixed_sigma.copy()
        if self.num < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.num}")
        return self._m2 / (self.num - 1)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object keeps numpy from appending a second ".npz"
            np.savez(f, mu=self.mu, sigma=self.sigma, num=np.int64(self.num),
                     feature_network=np.array(self.feature_network))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("mu", "sigma") if k not in z]
            if missing:
                raise KeyError(f"{path}: missing {missing}; has {sorted(z.files)}")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            num = int(z["num"]) if "num" in z else 0
            network = str(z["feature_network"]) if "feature_network" in z else "unknown"
        return cls.from_moments(mu, sigma, num, network)

    @classmethod
    def from_moments(cls, mu, sigma, num: int, feature_network: str) -> "FeatureStats":
        """Statistics known only by mean and covariance (e.g. precomputed reference files).

        `num` = 0 means the sample count is unknown: mu and sigma work, merging does not.
        """
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} do not fit together")
        stats = cls(len(mu), feature_network)
        stats._mean = mu.copy()
        if num >= 2:
            stats.num = int(num)
            stats._m2 = sigma * (num - 1)
        else:
            stats._fixed_sigma = sigma.copy()
        return stats

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, num={self.num}, feature_network={self.feature_network!r})"


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    When S1 S2 is singular (fewer samples than dimensions) sqrtm returns non-finite values;
    then eps is added to both diagonals. A small imaginary part from round-off is dropped; a
    large one means the inputs are not covariance matrices and raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not fit: mu1 {mu1.shape} mu2 {mu2.shape} sigma1 {sigma1.shape} sigma2 {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component of {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_from_features(x, y) -> float:
    """Exact FID between two feature sets (N1, D), (N2, D) without a D x D matrix square root.

    With A = (X - mu_x) / sqrt(N1 - 1) and B likewise, S_x S_y = A (A^T B B^T); its non-zero
    eigenvalues are those of M M^T for M = A^T B, so Tr sqrtm(S_x S_y) = sum of M's singular
    values. Costs O(D N1 N2): far cheaper than a 2048 x 2048 sqrtm when the sets are small
    (tests, rFID on a few hundred images), and free of the singular-matrix eps fallback.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected (N1, D) and (N2, D) features, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(x)} and {len(y)}")
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    a = (x - mu_x) / np.sqrt(len(x) - 1)  # (N1, D): rows are the columns of A
    b = (y - mu_y) / np.sqrt(len(y) - 1)  # (N2, D)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()  # singular values of A^T B, (N1, N2)
    diff = mu_x - mu_y
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * nuclear)


def _sqrtm(m: np.ndarray) -> np.ndarray:
    out = scipy.linalg.sqrtm(m)
    return out[0] if isinstance(out, tuple) else out


def fid_from_stats(generated: FeatureStats, reference: FeatureStats, allow_network_mismatch: bool = False) -> float:
    """FID between two statistics; refuses statistics from different feature networks unless told."""
    if generated.feature_network != reference.feature_network and not allow_network_mismatch:
        raise ValueError(
            f"feature networks differ: generated {generated.feature_network!r} vs reference "
            f"{reference.feature_network!r}; pass allow_network_mismatch=True to compare anyway"
        )
    return frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma)


@dataclass
class AdmReferenceBatch:
    """An ADM (guided-diffusion) reference batch such as `VIRTUAL_imagenet256_labeled.npz`.

    `stats` are the precomputed pool_3 moments (`mu`, `sigma`) from the TF Inception graph;
    `images` (`arr_0`, uint8 NHWC) can be fed to our own feature extractor instead, which is
    what precision/recall needs and what keeps FID within one feature network.
    """

    path: str
    stats: FeatureStats
    images: np.ndarray | None

    @property
    def name(self) -> str:
        return f"adm:{Path(self.path).name}"


def load_adm_reference(path: str | os.PathLike, load_images: bool = True) -> AdmReferenceBatch:
    """Load `mu`/`sigma` (and, unless told not to, the `arr_0` images) of an ADM reference batch."""
    path = str(path)
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("mu", "sigma") if k not in z]
        if missing:
            raise KeyError(f"{path} is not an ADM reference batch: missing {missing} (has {sorted(z.files)})")
        mu, sigma = z["mu"], z["sigma"]
        images = None
        if load_images and "arr_0" in z:
            images = z["arr_0"]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"{path}: arr_0 should be uint8 NHWC RGB, got {images.dtype} {images.shape}")
    # mu/sigma cover the whole dataset (ADM: all of ImageNet's train split), arr_0 only a sample of it
    # for precision/recall: the count behind the moments is not in the file, so it stays unknown (0).
    stats = FeatureStats.from_moments(mu, sigma, 0, ADM_FEATURE_NETWORK)
    return AdmReferenceBatch(path=path, stats=stats, images=images)


def save_adm_samples(path: str | os.PathLike, images, labels=None) -> Path:
    """Write samples as ADM's evaluator reads them: `arr_0` uint8 NHWC (+ `arr_1` labels).

    images: uint8 or [-1, 1] float, NCHW or NHWC (floats are rounded to the 0..255 grid).
    """
    from maskgil.images import to_uint8_nhwc

    arr = to_uint8_nhwc(images)  # (N, H, W, 3)
    arrays = {"arr_0": arr}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(arr),):
            raise ValueError(f"expected {len(arr)} labels, got shape {labels.shape}")
        arrays["arr_1"] = labels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path
