"""Named model shapes: the paper's four sizes (same shapes as LlamaGen GPT) and tiny CPU presets.

Parameter counts with vocab 16,384 and 1,000 classes: maskgil-b 111M, -l 343M, -xl 775M,
-xxl 1.4B; llamagen-b is exactly LlamaGen GPT-B (110,888,448).
"""
from __future__ import annotations

import torch

from maskgil.checkpoint import checked_fields
from maskgil.models.llama import LlamaGenerator
from maskgil.models.transformer import BidirectionalTransformer

# (n_layers, n_heads, dim) per paper size
SIZES = {"b": (12, 12, 768), "l": (24, 16, 1024), "xl": (36, 20, 1280), "xxl": (48, 24, 1536)}

# MaskGIL: bidirectional, 2D RoPE in every layer, QK-Norm (LayerNorm), Post-Norm.
MASKGIL = dict(causal=False, rope="2d", qk_norm="layernorm", post_norm=True)
# LlamaGen AR: causal, 2D RoPE, pre-norm only, no QK-Norm, token dropout 0.1.
LLAMAGEN = dict(causal=True, rope="2d", qk_norm="none", post_norm=False, token_dropout=0.1)

PRESETS: dict[str, tuple[type, dict]] = {}
for size, (layers, heads, dim) in SIZES.items():
    shape = dict(n_layers=layers, n_heads=heads, dim=dim)
    PRESETS[f"maskgil-{size}"] = (LlamaGenerator, {**shape, **MASKGIL})
    PRESETS[f"llamagen-{size}"] = (LlamaGenerator, {**shape, **LLAMAGEN})
PRESETS["transformer-b"] = (BidirectionalTransformer, dict(n_layers=12, n_heads=12, dim=768))
# MaskGIL-B on Open-MAGVIT2 LFQ codes (2^18): factorised into two 512-way sub-tokens, so the head
# is 2 x 512 rows instead of 262,144 (201.3M parameters at width 768).
PRESETS["maskgil-b-lfq"] = (LlamaGenerator, {"n_layers": 12, "n_heads": 12, "dim": 768, **MASKGIL,
                                             "vocab_size": 2 ** 18, "factorization": (9, 9)})

# Tiny presets for CPU tests and the quickstart: 8x8 token grids, small codebooks, 16 classes.
TINY = dict(vocab_size=512, num_classes=16, grid_size=(8, 8), multiple_of=64)
PRESETS["maskgil-tiny"] = (LlamaGenerator, {**MASKGIL, **TINY, "n_layers": 4, "n_heads": 4, "dim": 256})
PRESETS["llamagen-tiny"] = (LlamaGenerator, {**LLAMAGEN, **TINY, "n_layers": 4, "n_heads": 4, "dim": 256,
                                             "token_dropout": 0.0})
PRESETS["transformer-tiny"] = (BidirectionalTransformer, dict(vocab_size=512, num_classes=16, grid_size=(8, 8),
                                                              n_layers=4, n_heads=4, dim=256, dropout=0.0))
PRESETS["maskgil-tiny-lfq"] = (LlamaGenerator, {**MASKGIL, **TINY, "n_layers": 4, "n_heads": 4, "dim": 256,
                                                "vocab_size": 2 ** 10, "factorization": (5, 5)})


def preset_config(name: str, **overrides):
    """The config dataclass of preset `name`, with fields overridden (e.g. vocab_size, num_classes)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    cls, kwargs = PRESETS[name]
    cfg_cls = cls.config_class
    overrides = checked_fields(cfg_cls, overrides, f"{cfg_cls.__name__} field", f"{cfg_cls.__name__}.", TypeError)
    return cfg_cls(**{**kwargs, **overrides})


def build_model(name: str, device: str | torch.device | None = None, **overrides):
    """Instantiate a preset. Use device='meta' to count parameters without allocating."""
    cls, _ = PRESETS[name] if name in PRESETS else (None, None)
    cfg = preset_config(name, **overrides)
    if device is None:
        return cls(cfg)
    with torch.device(device):
        return cls(cfg)
