"""MaskGIL on Ray: masked and autoregressive image generators, tokenizers and their pipelines."""

__version__ = "0.1.0"
