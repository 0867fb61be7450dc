"""Image metrics: PSNR/SSIM, Inception features, FID, precision/recall, IS, and the one call that
combines them for generated images (`compute_generation_metrics`)."""
from maskgil.metrics.fid import (
    FeatureStats,
    fid_from_stats,
    frechet_distance,
    frechet_distance_from_features,
    load_adm_reference,
    save_adm_samples,
)
from maskgil.metrics.generation import Reference, compute_generation_metrics, extract_features
from maskgil.metrics.image_quality import psnr, ssim
from maskgil.metrics.inception import InceptionFeatureExtractor
from maskgil.metrics.inception_score import inception_score
from maskgil.metrics.precision_recall import precision_recall

__all__ = [
    "FeatureStats", "InceptionFeatureExtractor", "Reference", "compute_generation_metrics", "extract_features",
    "fid_from_stats", "frechet_distance", "frechet_distance_from_features", "inception_score", "load_adm_reference",
    "precision_recall", "psnr", "save_adm_samples", "ssim",
]
