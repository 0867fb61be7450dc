"""Image metrics: PSNR/SSIM, Inception features, FID, precision/recall, IS."""
from maskgil.metrics.fid import FeatureStats, fid_from_stats, frechet_distance, load_adm_reference
from maskgil.metrics.image_quality import psnr, ssim
from maskgil.metrics.inception import InceptionFeatureExtractor

__all__ = ["FeatureStats", "InceptionFeatureExtractor", "fid_from_stats", "frechet_distance",
           "load_adm_reference", "psnr", "ssim"]
