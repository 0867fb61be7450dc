"""Named tokenizer presets: the paper's four tokenizers and a `-tiny` version of each for 2 CPU cores.

Full presets (downsample 16, 256 px -> 16x16 tokens):
  llamagen-vq      LlamaGen VQ-16: 16,384 x 8 l2-normalised codes, 71,883,403 params (loads vq_ds16_c2i.pt)
  vqgan-maskgit    taming-lineage VQGAN, 1,024 x 256 codebook (MaskGIT-VQ size), no attention
  vqgan-chameleon  taming-lineage VQGAN, 8,192 x 256 codebook (Chameleon-VQ size), attention at 16x16
  lfq-magvit2      Open-MAGVIT2-style LFQ, 18 bits -> 2^18 = 262,144 implicit codes
Tiny presets (downsample 8, 64 px -> 8x8 tokens, ~1M params) train in minutes on 2 CPU cores;
`llamagen-vq-tiny` drops GroupNorm and attention so that its codes are local (the quickstart's).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from maskgil.checkpoint import checked_fields
from maskgil.precision import CONV_MEMORY_FORMAT
from maskgil.tokenizers.base import ImageTokenizer
from maskgil.tokenizers.lfq import LFQConfig, LFQTokenizer
from maskgil.tokenizers.vq import VQConfig, VQTokenizer

_TINY_CONV = dict(ch=16, ch_mult=(1, 2, 4, 4), enc_res_blocks=1, dec_res_blocks=2, z_channels=32, norm_groups=8)

TOKENIZER_PRESETS: dict[str, tuple[type, Any]] = {
    "llamagen-vq": (VQTokenizer, VQConfig()),
    # Local codes for a generator that has minutes to learn them: no GroupNorm, no attention (see
    # layers.norm_layer). Recolouring the object then keeps 56% of the far background codes instead of 7%.
    "llamagen-vq-tiny": (VQTokenizer, VQConfig(**_TINY_CONV, codebook_size=512, codebook_dim=8, usage_window=8192,
                                               norm="none", attn_at_lowest=False, mid_attn=False)),
    "vqgan-maskgit": (VQTokenizer, VQConfig(codebook_size=1024, codebook_dim=256, l2_norm=False,
                                            attn_at_lowest=False, mid_attn=False)),
    "vqgan-maskgit-tiny": (VQTokenizer, VQConfig(**_TINY_CONV, codebook_size=256, codebook_dim=32, l2_norm=False,
                                                 attn_at_lowest=False, mid_attn=False, usage_window=8192)),
    "vqgan-chameleon": (VQTokenizer, VQConfig(codebook_size=8192, codebook_dim=256, l2_norm=False)),
    "vqgan-chameleon-tiny": (VQTokenizer, VQConfig(**_TINY_CONV, codebook_size=1024, codebook_dim=32,
                                                   l2_norm=False, usage_window=8192)),
    "lfq-magvit2": (LFQTokenizer, LFQConfig()),
    # 12 bits = 4,096 implicit codes (factorise as (6, 6)); the full preset's 18 bits also run at 64 px.
    "lfq-magvit2-tiny": (LFQTokenizer, LFQConfig(ch=16, ch_mult=(1, 2, 4, 4), enc_res_blocks=1, dec_res_blocks=2,
                                                 norm_groups=8, bits=12, usage_window=8192)),
}


def tokenizer_config(name: str, **overrides: Any) -> VQConfig | LFQConfig:
    """The config of preset `name` with fields replaced; unknown fields and wrong types raise."""
    if name not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; known: {sorted(TOKENIZER_PRESETS)}")
    config = TOKENIZER_PRESETS[name][1]
    kind = type(config).__name__
    return replace(config, **checked_fields(type(config), overrides, f"{kind} field", f"{kind}.", TypeError))


def build_tokenizer(name: str, **overrides: Any) -> ImageTokenizer:
    """A freshly initialised tokenizer from a preset; keyword overrides replace config fields."""
    config = tokenizer_config(name, **overrides)  # raises on an unknown preset
    return TOKENIZER_PRESETS[name][0](config).to(memory_format=CONV_MEMORY_FORMAT)
