"""Load LlamaGen GPT (c2i) checkpoints into the causal `LlamaGenerator` by key name.

LlamaGen keys map one to one onto ours; the only extra is a stray `freqs_cis` buffer in some
checkpoints, which is dropped. `llamagen_compat=True` reproduces LlamaGen's zero rotary rows at
the class position so logits match LlamaGen's forward given the same weights.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from maskgil.checkpoint import check_state_dict
from maskgil.models.llama import LlamaGenerator
from maskgil.models.presets import preset_config

IGNORED_KEYS = ("freqs_cis",)


def llamagen_state_dict(obj) -> dict[str, torch.Tensor]:
    """Accept `ckpt` with a "model" entry (LlamaGen's training checkpoints) or a bare state dict."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict or a checkpoint with 'model', got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if k not in IGNORED_KEYS}


def load_llamagen_gpt(source, preset: str = "llamagen-b", compat: bool = True, **overrides) -> LlamaGenerator:
    """Build preset `preset` and load LlamaGen weights strictly.

    `source`: a path to a LlamaGen `.pt` (loaded with weights_only=True) or an in-memory dict.
    Width, depth, vocabulary size and class count are read from the weights' shapes; the head
    count comes from the preset (or an override)."""
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    state = llamagen_state_dict(source)
    vocab, dim = state["output.weight"].shape
    n_cls = state["cls_embedding.embedding_table.weight"].shape[0] - 1
    n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    cfg = preset_config(preset, **{"vocab_size": vocab, "num_classes": n_cls, "dim": dim, "n_layers": n_layers,
                                   "llamagen_compat": compat, **overrides})
    with torch.device("meta"):
        model = LlamaGenerator(cfg)
    check_state_dict(model, state)
    model.load_state_dict(state, assign=True)
    return model.eval()
