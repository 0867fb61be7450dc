"""LLaMA block stack for image tokens: MaskGIL (bidirectional) and LlamaGen-style AR (causal).

One model class; the paper's design choices are config flags so its ablations can be rerun:
`causal`, `rope` (2d | 1d | none), `qk_norm` (layernorm | rmsnorm | none), `post_norm`.

Sequence layout: [prefix tokens (class embedding, or projected text features); h*w image tokens].
`forward` returns logits aligned with image positions for both kinds:
- bidirectional: logits[:, i] predicts token i from every visible token (unknown ones = mask id);
- causal: the input is [prefix; tokens[:-1]] and logits[:, i] predicts token i from tokens < i.

Module names follow LlamaGen's GPT (`tok_embeddings`, `layers.{i}.attention.wqkv`,
`feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`, `norm`, `output`,
`cls_embedding.embedding_table`) so its checkpoints load by key name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskgil.checkpoint import register_model
from maskgil.models.rope import apply_rope, rope_table


def ffn_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    """SwiGLU hidden size: 8/3 * dim rounded up to a multiple of `multiple_of` (LLaMA / LlamaGen)."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class LlamaConfig:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    vocab_size: int = 16384  # codebook size; masked models get one extra input row: mask id = vocab_size
    num_classes: int = 1000  # class conditioning with a null row at index num_classes (CFG)
    cond: str = "class"  # "class" | "text"
    text_dim: int = 0  # width of text-encoder features (cond == "text")
    text_len: int = 0  # text prefix length (cond == "text")
    text_encoder: str = ""  # the encoder whose features the prefix expects (maskgil.text; "" = the default)
    causal: bool = False
    rope: str = "2d"  # "2d" | "1d" | "none"
    rope_theta: float = 10000.0
    qk_norm: str = "layernorm"  # "layernorm" | "rmsnorm" | "none"
    post_norm: bool = True
    multiple_of: int = 256
    norm_eps: float = 1e-5
    class_dropout: float = 0.1  # probability of the null condition in training (CFG)
    dropout: float = 0.0  # residual / attention dropout
    token_dropout: float = 0.0  # dropout on input embeddings (LlamaGen uses 0.1)
    grid_size: tuple[int, int] = (16, 16)  # default token grid; any grid works at run time
    llamagen_compat: bool = False  # LlamaGen quirk: zero (not identity) rotary rows at prefix positions
    init_std: float = 0.02
    # Token factorisation for huge implicit codebooks (Open-MAGVIT2 LFQ, 2^18 codes): bits per
    # sub-token, most significant first, e.g. (9, 9) or (6, 12). Inputs are summed sub-token
    # embeddings, outputs one head per sub-token (logits concatenated); vocab_size = 2^sum(bits).
    factorization: tuple[int, ...] = ()

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} not divisible by n_heads {self.n_heads}")
        if self.rope not in ("2d", "1d", "none"):
            raise ValueError(f"rope must be 2d/1d/none, got {self.rope!r}")
        if self.qk_norm not in ("layernorm", "rmsnorm", "none"):
            raise ValueError(f"qk_norm must be layernorm/rmsnorm/none, got {self.qk_norm!r}")
        if self.cond not in ("class", "text"):
            raise ValueError(f"cond must be class/text, got {self.cond!r}")
        if self.cond == "text" and (self.text_dim <= 0 or self.text_len <= 0):
            raise ValueError("text conditioning needs text_dim > 0 and text_len > 0")
        self.grid_size = tuple(self.grid_size)
        self.factorization = tuple(self.factorization)
        if self.factorization and 2 ** sum(self.factorization) != self.vocab_size:
            raise ValueError(f"factorization {self.factorization} covers 2^{sum(self.factorization)} codes, "
                             f"vocab_size is {self.vocab_size}")

    @property
    def sub_vocab_sizes(self) -> tuple[int, ...]:
        """Output sizes of the heads: (vocab_size,) or one 2^bits per sub-token."""
        return tuple(2 ** b for b in self.factorization) or (self.vocab_size,)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def prefix_len(self) -> int:
        return 1 if self.cond == "class" else self.text_len

    @property
    def mask_token_id(self) -> int | None:
        return None if self.causal else self.vocab_size

    @property
    def null_class(self) -> int:
        return self.num_classes


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """Bias-free `layer(x)`. For a handful of rows (AR decoding, no grad) it computes W @ x^T, which
    streams the weight at memory bandwidth: ~4x faster on CPU than x @ W^T for 2 rows."""
    rows = x.numel() // x.shape[-1]
    if rows <= 16 and not torch.is_grad_enabled():
        return (layer.weight @ x.reshape(rows, x.shape[-1]).T).T.reshape(*x.shape[:-1], layer.weight.shape[0])
    return layer(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class HeadNorm(nn.Module):
    """QK-Norm: normalise each head's q or k over head_dim, with per-head affine weights."""

    def __init__(self, n_heads: int, head_dim: int, kind: str, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(n_heads, 1, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, head_dim)) if kind == "layernorm" else None

    def forward(self, x):  # x: (B, H, L, Dh)
        xf = x.float()
        if self.kind == "layernorm":
            xf = F.layer_norm(xf, xf.shape[-1:], eps=self.eps)
            return (xf * self.weight + self.bias).type_as(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).type_as(x)


class KVCache:
    """Preallocated keys/values for AR decoding: (B, H, max_len, Dh), written in place.

    Shapes never change while decoding: a step writes its positions and attends over the whole
    buffer under a mask, so one compiled decode step serves every position. Plain tensors, not
    module buffers: torch.compile then lets the batch size vary within one graph instead of
    compiling a graph per batch size. On CUDA they are marked as static addresses, so CUDA
    graphs write them in place instead of copying them in at every step."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        if self.k.is_cuda:
            torch._dynamo.mark_static_address(self.k, guard=False)
            torch._dynamo.mark_static_address(self.v, guard=False)

    def update(self, positions, k, v):  # positions (T,) long; k, v (B, H, T, Dh)
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        return self.k, self.v  # (B, H, max_len, Dh); unwritten rows are masked out by the caller


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        if cfg.qk_norm != "none":
            self.q_norm = HeadNorm(cfg.n_heads, cfg.head_dim, cfg.qk_norm, cfg.norm_eps)
            self.k_norm = HeadNorm(cfg.n_heads, cfg.head_dim, cfg.qk_norm, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.dropout = cfg.dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x, rope, attn_mask=None, is_causal=False, cache_positions=None):
        # x: (B, L, D); rope: (L, Dh/2, 2) for these positions; attn_mask: bool, True = may attend;
        # cache_positions: (L,) sequence positions of x in the KV cache (AR decoding)
        B, L, D = x.shape
        q, k, v = linear(x, self.wqkv).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, Dh)
        if self.q_norm is not None:  # QK-Norm before RoPE (Chameleon placement)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache_positions is not None:
            k, v = self.kv_cache.update(cache_positions, k, v)  # (B, H, max_len, Dh)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, L, Dh)
        return linear(y.transpose(1, 2).reshape(B, L, D), self.wo)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        hidden = ffn_hidden_dim(cfg.dim, cfg.multiple_of)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x):
        return linear(F.silu(linear(x, self.w1)) * linear(x, self.w3), self.w2)


class Block(nn.Module):
    """Pre-norm LLaMA block; with `post_norm` also a norm on each branch output (sandwich)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.post_norm:
            self.attention_post_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.ffn_post_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        else:
            self.attention_post_norm = self.ffn_post_norm = None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, attn_mask=None, is_causal=False, cache_positions=None):
        h = self.attention(self.attention_norm(x), rope, attn_mask, is_causal, cache_positions)
        if self.attention_post_norm is not None:
            h = self.attention_post_norm(h)
        x = x + self.drop(h)
        h = self.feed_forward(self.ffn_norm(x))
        if self.ffn_post_norm is not None:
            h = self.ffn_post_norm(h)
        return x + self.drop(h)


def check_class_ids(labels: torch.Tensor, num_classes: int):
    """Class conditioning takes integer ids (B,) in [0, num_classes]; num_classes is the null class."""
    if labels.dtype.is_floating_point or labels.dim() != 1:
        raise ValueError(f"class conditioning expects integer labels (B,), got {labels.dtype} {tuple(labels.shape)}")
    if ((labels < 0) | (labels > num_classes)).any():
        raise ValueError(f"class ids must be in [0, {num_classes}] ({num_classes} = null)")


class ClassEmbedding(nn.Module):
    """Class table with a null row (index num_classes) used for CFG's unconditional branch."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels, drop=None):  # labels (B,) -> (B, 1, D)
        if not torch.compiler.is_compiling():  # a graph cannot branch on values: compiled callers check first
            check_class_ids(labels, self.num_classes)
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)[:, None]


class TextProjection(nn.Module):
    """Projects text-encoder features into prefix tokens; a learned null sequence serves CFG."""

    def __init__(self, text_dim: int, text_len: int, dim: int):
        super().__init__()
        self.text_len = text_len
        self.mlp = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.null_text = nn.Parameter(torch.randn(text_len, text_dim) * 0.02)

    def forward(self, feats, drop=None):  # feats (B, L, text_dim) -> (B, text_len, D)
        if not feats.dtype.is_floating_point or feats.dim() != 3:
            raise ValueError(f"text conditioning expects float features (B, L, text_dim), got {tuple(feats.shape)}")
        B, L, _ = feats.shape
        if L > self.text_len:
            raise ValueError(f"text has {L} tokens, model prefix holds {self.text_len}")
        if L < self.text_len:
            feats = F.pad(feats, (0, 0, 0, self.text_len - L))
        if drop is not None:
            feats = torch.where(drop[:, None, None], self.null_text.to(feats.dtype).expand_as(feats), feats)
        return self.mlp(feats)


@register_model("llama")
class LlamaGenerator(nn.Module):
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = cfg = config
        extra = 0 if cfg.causal else 1  # + mask token for masked models
        if cfg.factorization:
            self.sub_embeddings = nn.ModuleList(nn.Embedding(v + extra, cfg.dim) for v in cfg.sub_vocab_sizes)
        else:
            self.tok_embeddings = nn.Embedding(cfg.vocab_size + extra, cfg.dim)
        if cfg.cond == "class":
            self.cls_embedding = ClassEmbedding(cfg.num_classes, cfg.dim)
        else:
            self.text_projection = TextProjection(cfg.text_dim, cfg.text_len, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.factorization:
            self.sub_heads = nn.ModuleList(nn.Linear(cfg.dim, v, bias=False) for v in cfg.sub_vocab_sizes)
        else:
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._rope_cache: dict = {}
        self._decoding: dict | None = None  # KV-cache decoding state (setup_kv_cache)
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ helpers
    @property
    def mask_token_id(self) -> int | None:
        return self.config.mask_token_id

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def split_tokens(self, tokens) -> torch.Tensor:
        """(B, N) codes -> (B, N, S) sub-tokens (S = 1 without factorisation); mask id -> each sub mask id."""
        if not self.config.factorization:
            return tokens[..., None]
        from maskgil.tokenizers.lfq import factorize_codes

        masked = tokens == self.config.vocab_size
        sub = factorize_codes(torch.where(masked, 0, tokens), self.config.factorization)
        sizes = torch.tensor(self.config.sub_vocab_sizes, device=tokens.device)
        return torch.where(masked[..., None], sizes, sub)

    def split_logits(self, logits) -> list[torch.Tensor]:
        """(B, N, sum of head sizes) -> one (B, N, V_s) tensor per sub-token."""
        return list(logits.split(self.config.sub_vocab_sizes, dim=-1))

    def join_tokens(self, sub_tokens) -> torch.Tensor:
        """(B, N, S) sub-tokens -> (B, N) codes."""
        if not self.config.factorization:
            return sub_tokens[..., 0]
        from maskgil.tokenizers.lfq import unfactorize_codes

        return unfactorize_codes(sub_tokens, self.config.factorization)

    def embed_tokens(self, tokens):  # (B, T) -> (B, T, D)
        if not self.config.factorization:
            return self.tok_embeddings(tokens)
        sub = self.split_tokens(tokens)
        return sum(emb(sub[..., j]) for j, emb in enumerate(self.sub_embeddings))

    def head(self, h):  # (B, T, D) -> (B, T, sum of head sizes)
        if not self.config.factorization:
            return linear(h, self.output)
        return torch.cat([linear(h, head) for head in self.sub_heads], dim=-1)

    def reset_buffers(self, device=None):
        self._rope_cache = {}

    def rope(self, grid: tuple[int, int], device) -> torch.Tensor | None:
        """cos/sin table for [prefix; grid], cached per (grid, device)."""
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            c = self.config
            self._rope_cache[key] = rope_table(c.rope, c.head_dim, grid[0], grid[1], c.prefix_len, c.rope_theta,
                                               zero_prefix=c.llamagen_compat, device=device)
        return self._rope_cache[key]

    def embed_condition(self, cond, drop=None):
        """cond: (B,) class ids or (B, L, text_dim) features -> prefix embeddings (B, P, D)."""
        if self.config.cond == "class":
            return self.cls_embedding(cond, drop)
        return self.text_projection(cond, drop)

    def _check_tokens(self, tokens, grid):
        h, w = grid
        if tokens.dim() != 2 or tokens.shape[1] != h * w:
            raise ValueError(f"tokens must be (B, {h * w}) for grid {h}x{w}, got {tuple(tokens.shape)}")

    # ------------------------------------------------------------------ training / full forward
    def forward(self, tokens, cond, grid: tuple[int, int] | None = None, drop_cond=None, text_mask=None,
                return_hidden: bool = False, positions: torch.Tensor | None = None):
        """tokens (B, h*w) long (mask id at unknown positions for masked models), cond (B,) or (B, L, Dt).

        Returns logits (B, h*w, vocab) aligned with image positions (see module docstring). With
        `positions` (M,) long, flat indices into the B*h*w image positions, only those rows reach
        the vocabulary head and the logits are (M, vocab) in the compute dtype (the loss upcasts
        them; under bf16 that saves an fp32 copy of the largest activation): the masked objective
        scores ~2/3 of the tokens, so the head and the loss skip the rest."""
        if positions is not None and return_hidden:
            raise ValueError("return_hidden and positions do not combine")
        grid = tuple(grid or self.config.grid_size)
        self._check_tokens(tokens, grid)
        B, N = tokens.shape
        P = self.config.prefix_len
        if drop_cond is None and self.training and self.config.class_dropout > 0:  # CFG training, drawn here
            drop_cond = torch.rand(B, device=tokens.device) < self.config.class_dropout  # (the text key mask needs it)
        prefix = self.embed_condition(cond, drop_cond)  # (B, P, D)
        body = tokens[:, :-1] if self.config.causal else tokens  # causal: token i is predicted at i-1
        x = torch.cat([prefix, self.embed_tokens(body)], dim=1)  # (B, L, D); L = P + N (- 1 if causal)
        x = self.tok_dropout(x)
        L = x.shape[1]
        rope = self.rope(grid, x.device)
        rope = rope[:L] if rope is not None else None
        mask = self._attn_mask(B, L, text_mask, x.device, drop_cond)
        for layer in self.layers:
            x = layer(x, rope, attn_mask=mask, is_causal=self.config.causal)
        h = self.norm(x)[:, P - 1:P - 1 + N] if self.config.causal else self.norm(x)[:, P:]  # (B, N, D)
        if positions is not None:
            return self.head(h.reshape(B * N, -1).index_select(0, positions))  # (M, V)
        logits = self.head(h).float()  # (B, N, V) (V = sum of sub-token heads when factorised)
        return (logits, h) if return_hidden else logits

    def _key_mask(self, B, L, text_mask, device, drop_cond=None):
        """(B, 1, 1, L) bool, True = a valid key, or None: hides padded text prefix tokens.

        `text_mask` (B, Lt) marks the real word pieces of features padded to Lt <= text_len; the
        prefix slots past Lt (padded inside the model) are hidden too, so a caption's output does
        not depend on the longest caption of its batch. A dropped condition (CFG's null text) is
        the learned null sequence, seen whole whatever the caption's length."""
        if text_mask is None:
            return None
        P = self.config.prefix_len
        if text_mask.shape[1] > P:
            raise ValueError(f"text_mask covers {text_mask.shape[1]} tokens, the model prefix holds {P}")
        keys = torch.ones(B, L, dtype=torch.bool, device=device)
        keys[:, :P] = False
        keys[:, : text_mask.shape[1]] = text_mask.to(device).bool()
        if drop_cond is not None:
            keys[:, :P] |= drop_cond.to(device).bool()[:, None]
        keys[:, P - 1] |= ~keys[:, :P].any(1)  # never leave a row with no key
        return keys[:, None, None, :]

    def _attn_mask(self, B, L, text_mask, device, drop_cond=None):
        """Boolean mask (True = attend) or None (then SDPA's own causal flag does the work)."""
        mask = self._key_mask(B, L, text_mask, device, drop_cond)
        if mask is not None and self.config.causal:
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=device).tril()
        return mask

    # ------------------------------------------------------------------ AR decoding with a KV cache
    def setup_kv_cache(self, batch_size: int, grid: tuple[int, int], dtype=None, device=None):
        """Allocate a cache for [prefix; h*w] positions and fix the decoding grid. Causal models only.

        A cache of the same shape left by the previous call is reused, not reallocated: stale
        entries sit at positions no query may see until they are overwritten, and compiled steps
        (CUDA graphs above all) keep seeing the same buffers."""
        if not self.config.causal:
            raise RuntimeError("KV caching is for causal models; masked models decode in parallel")
        p = next(self.parameters())
        device, dtype = torch.device(device) if device is not None else p.device, dtype or p.dtype
        grid = tuple(grid)
        L = self.config.prefix_len + grid[0] * grid[1]
        shape = (batch_size, self.config.n_heads, L, self.config.head_dim)
        for layer in self.layers:
            old = layer.attention.kv_cache
            if old is None or (old.k.shape, old.k.dtype, old.k.device) != (shape, dtype, device):
                layer.attention.kv_cache = KVCache(*shape, dtype, device)
        rope = self.rope(grid, device)
        self._decoding = {"rope": rope, "key_positions": torch.arange(L, device=device), "key_mask": None}

    def clear_kv_cache(self):
        """Free the cache (compiled decoding keeps it between calls for reuse)."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self._decoding = None

    def _decoding_state(self) -> dict:
        if self._decoding is None:
            raise RuntimeError("call setup_kv_cache(batch_size, grid) before prefill/decode")
        return self._decoding

    def _cached_forward(self, x, positions):
        """Run embeddings x (B, T, D) at sequence positions `positions` (T,) through the cached stack.

        Every shape is fixed by the cache, not by the position: queries attend over the whole
        cache under a mask (key <= query position, text padding hidden), so a compiled step
        serves every position without recompiling."""
        state = self._decoding_state()
        rope = state["rope"]
        rope = rope.index_select(0, positions) if rope is not None else None  # (T, Dh/2, 2)
        mask = (state["key_positions"][None, :] <= positions[:, None])[None, None]  # (1, 1, T, L)
        if state["key_mask"] is not None:
            mask = mask & state["key_mask"]  # (B, 1, T, L)
        for layer in self.layers:
            x = layer(x, rope, attn_mask=mask, cache_positions=positions)
        return self.head(self.norm(x[:, -1])).float()  # (B, V): logits for the next token

    @torch.no_grad()
    def prefill(self, cond, drop_cond=None, text_mask=None):
        """Write the prefix into the cache; returns logits (B, V) for image token 0."""
        state = self._decoding_state()
        x = self.embed_condition(cond, drop_cond)  # (B, P, D)
        state["key_mask"] = self._key_mask(len(x), len(state["key_positions"]), text_mask, x.device, drop_cond)
        return self._cached_forward(x, state["key_positions"][: self.config.prefix_len])

    @torch.no_grad()
    def decode_tokens(self, tokens, start_index: int):
        """Feed image tokens (B, T) at image positions [start_index, start_index+T) into the cache.

        Returns logits (B, V) predicting image token start_index + T."""
        start = self.config.prefix_len + start_index
        positions = self._decoding_state()["key_positions"][start:start + tokens.shape[1]]  # (T,)
        return self.decode_step(tokens, positions)

    def decode_step(self, tokens, positions):
        """tokens (B, T) at sequence positions (T,) -> logits (B, V) for the next token.

        No Python-level shape depends on the position: this is the function to torch.compile."""
        return self._cached_forward(self.embed_tokens(tokens), positions)
