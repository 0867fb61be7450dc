"""Generators: MaskGIL / LlamaGen-style LLaMA stacks and the Bidirectional Transformer baseline."""
from maskgil.models.llama import LlamaConfig, LlamaGenerator, ffn_hidden_dim
from maskgil.models.llamagen import load_llamagen_gpt
from maskgil.models.presets import PRESETS, build_model, preset_config
from maskgil.models.transformer import BidirectionalTransformer, TransformerConfig

__all__ = [
    "LlamaConfig", "LlamaGenerator", "ffn_hidden_dim", "load_llamagen_gpt", "PRESETS", "build_model",
    "preset_config", "BidirectionalTransformer", "TransformerConfig",
]
