"""Samplers: MaskGIT parallel decoding, AR with KV cache, and AR->MAR fusion."""
from maskgil.sampling.ar import sample_ar
from maskgil.sampling.fusion import sample_fusion
from maskgil.sampling.logits import cfg_combine, cfg_scale_at, filter_logits, sample_from_logits, sample_tokens
from maskgil.sampling.maskgit import guided_logits, sample_maskgit
from maskgil.sampling.schedules import mask_fraction, masked_after_steps, reveal_counts, training_mask_counts

__all__ = [
    "sample_ar", "sample_fusion", "sample_maskgit", "guided_logits", "cfg_combine", "cfg_scale_at",
    "filter_logits", "sample_from_logits", "sample_tokens", "mask_fraction", "masked_after_steps", "reveal_counts",
    "training_mask_counts",
]
