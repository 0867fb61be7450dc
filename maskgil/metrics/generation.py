"""Generation metrics in one call, with the names of what produced every number.

A `Reference` is what generated images are compared with: feature statistics (FID) and, when
kept, the features themselves (precision/recall). It is built once from real images (a folder,
the embedded val split, an ADM reference batch) and cached as `.npz`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from maskgil.metrics.fid import (
    AdmReferenceBatch,
    FeatureStats,
    comparable_networks,
    fid_from_stats,
    frechet_distance_from_features,
)
from maskgil.metrics.inception import InceptionFeatureExtractor
from maskgil.metrics.inception_score import inception_score
from maskgil.metrics.precision_recall import precision_recall

# Below this many images FID is biased upwards by an amount that depends on the count (it is not
# comparable across counts; papers use 50,000); results say so.
FID_SMALL_SAMPLE = 2048


@dataclass
class Reference:
    name: str
    stats: FeatureStats
    features: np.ndarray | None = None  # (N, D) float32; needed for precision/recall

    @property
    def feature_network(self) -> str:
        return self.stats.feature_network

    @classmethod
    def from_features(cls, features, feature_network: str, name: str) -> "Reference":
        features = np.asarray(features, np.float32)
        return cls(name, FeatureStats.from_features(features, feature_network), features)

    @classmethod
    def from_adm(cls, batch: AdmReferenceBatch, extractor: InceptionFeatureExtractor | None = None,
                 batch_size: int = 256) -> "Reference":
        """With an extractor, re-extract features from `arr_0` (same network as the samples, and
        precision/recall become possible); without, use the precomputed TF-graph mu/sigma."""
        if extractor is None:
            return cls(batch.name + " (precomputed mu/sigma)", batch.stats, None)
        if batch.images is None:
            raise ValueError(f"{batch.path}: images were not loaded (load_adm_reference(load_images=True))")
        batches = (batch.images[i:i + batch_size] for i in range(0, len(batch.images), batch_size))
        feats, _ = extract_features(extractor, batches, total=len(batch.images))
        return cls.from_features(feats, extractor.feature_network, batch.name)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(mu=self.stats.mu, sigma=self.stats.sigma, num=np.int64(self.stats.num),
                      feature_network=np.array(self.feature_network), name=np.array(self.name))
        if self.features is not None:
            arrays["features"] = self.features
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Reference":
        stats = FeatureStats.load(path)
        with np.load(path, allow_pickle=False) as z:
            name = str(z["name"]) if "name" in z else Path(path).name
            features = z["features"] if "features" in z else None
        return cls(name, stats, features)


def extract_features(extractor: InceptionFeatureExtractor, batches: Iterable, want_logits: bool = False,
                     total: int | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (and logits) of a stream of image batches, with a progress bar over images."""
    feats, logits = [], []
    with tqdm(total=total, unit="img", desc="inception features", disable=not progress) as bar:
        for images in batches:
            if want_logits:
                f, lg = extractor.features_and_logits(images)
                logits.append(lg)
            else:
                f = extractor.features(images)
            feats.append(f)
            bar.update(len(f))
    if not feats:
        raise ValueError("no images were given")
    return np.concatenate(feats), (np.concatenate(logits) if want_logits else None)


def compute_generation_metrics(gen_features, reference: Reference, gen_logits=None, feature_network: str | None = None,
                               k: int = 3, allow_network_mismatch: bool = False, device="cpu") -> dict:
    """FID, precision/recall (when the reference kept its features) and IS (when logits are given).

    gen_features: (N, D) array, or a FeatureStats when only streamed statistics were kept (then
    no precision/recall). `feature_network` names the network of an array (a FeatureStats
    carries its own). The result names the feature networks and the reference used.
    """
    if isinstance(gen_features, FeatureStats):
        gen_stats, gen_array = gen_features, None
    else:
        if feature_network is None:
            raise ValueError("feature_network is required with a feature array: name the network that made it")
        gen_array = np.asarray(gen_features, np.float32)
        gen_stats = FeatureStats.from_features(gen_array, feature_network)
    out = {
        "num_generated": gen_stats.num,
        "num_reference": reference.stats.num or None,  # None: moments without a count (ADM's precomputed)
        "feature_network": gen_stats.feature_network,
        "reference": reference.name,
        "reference_feature_network": reference.feature_network,
    }
    same = gen_stats.feature_network == reference.feature_network
    if not same and comparable_networks(gen_stats.feature_network, reference.feature_network):
        allow_network_mismatch = True  # a port of the graph behind ADM's precomputed mu/sigma
        out["fid_note"] = (f"reference mu/sigma from {reference.feature_network}; samples through a PyTorch port of "
                           "that graph, whose features differ from the TF graph's by its numerical error")
    small = gen_array is not None and reference.features is not None and min(len(gen_array), len(reference.features)) < gen_stats.dim
    if small and (same or allow_network_mismatch):
        out["fid"] = frechet_distance_from_features(gen_array, reference.features)  # exact, no D x D sqrtm
    else:
        out["fid"] = fid_from_stats(gen_stats, reference.stats, allow_network_mismatch)
    if gen_stats.num < FID_SMALL_SAMPLE:
        note = (f"FID from {gen_stats.num} samples is biased upwards and depends on the count: compare it only with "
                f"FIDs from as many samples (papers use 50,000)")
        out["fid_note"] = f"{out['fid_note']}; {note}" if "fid_note" in out else note
    if gen_array is not None and reference.features is not None:
        out.update(precision_recall(reference.features, gen_array, k=k, device=device))
    if gen_logits is not None:
        out["inception_score"], out["inception_score_std"] = inception_score(gen_logits)
    return out
