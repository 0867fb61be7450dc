"""Image tokenizers: images <-> discrete codes (LlamaGen-VQ, VQGAN, Open-MAGVIT2 LFQ).

    tok = build_tokenizer("llamagen-vq-tiny")
    codes = tok.encode(images)     # uint8 (B,H,W,3)/(B,3,H,W) or float (B,3,H,W) in [-1,1] -> long (B,h,w)
    imgs = tok.decode(codes)       # -> float (B,3,H,W) in [-1,1]
    tok.save_pretrained(d); load_tokenizer(d)
"""
from maskgil.tokenizers.base import ImageTokenizer, load_tokenizer, to_model_input
from maskgil.tokenizers.lfq import LFQConfig, LFQTokenizer, factorize_codes, lfq_entropy_terms, unfactorize_codes
from maskgil.tokenizers.presets import TOKENIZER_PRESETS, build_tokenizer
from maskgil.tokenizers.vq import VQConfig, VQTokenizer, VectorQuantizer, load_llamagen_vq, vq_from_state_dict

__all__ = [
    "ImageTokenizer", "load_tokenizer", "to_model_input", "TOKENIZER_PRESETS", "build_tokenizer",
    "LFQConfig", "LFQTokenizer", "factorize_codes", "unfactorize_codes", "lfq_entropy_terms",
    "VQConfig", "VQTokenizer", "VectorQuantizer", "load_llamagen_vq", "vq_from_state_dict",
]
