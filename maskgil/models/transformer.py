"""The paper's Bidirectional Transformer baseline (MaskGIT / BERT style).

What distinguishes it from MaskGIL: learned absolute position embeddings (a 2D table, so
smaller grids index its top-left corner), LayerNorm, GELU MLP, biases everywhere, post-LN
residual blocks as in BERT, and an MLM head whose logits are tied to the token embedding.
Same call signature as `LlamaGenerator` so trainers and samplers treat both alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskgil.checkpoint import register_model


@dataclass
class TransformerConfig:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_ratio: float = 4.0
    vocab_size: int = 16384
    num_classes: int = 1000
    class_dropout: float = 0.1
    dropout: float = 0.1
    grid_size: tuple[int, int] = (16, 16)  # the largest grid the position table covers
    norm_eps: float = 1e-12
    init_std: float = 0.02
    causal: bool = False  # always bidirectional; present so callers can branch on it uniformly
    cond: str = "class"
    factorization: tuple[int, ...] = ()  # not supported by the baseline; present for uniform callers

    def __post_init__(self):
        self.grid_size = tuple(self.grid_size)
        if self.causal:
            raise ValueError("the Bidirectional Transformer baseline is never causal")
        if self.factorization:
            raise ValueError("token factorisation is implemented for the LLaMA models only")
        if self.cond != "class":
            raise ValueError("the Bidirectional Transformer baseline is class-conditional; text conditioning is "
                             "implemented for the LLaMA models (cond='text')")

    @property
    def prefix_len(self) -> int:
        return 1

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size

    @property
    def sub_vocab_sizes(self) -> tuple[int, ...]:
        return (self.vocab_size,)

    @property
    def null_class(self) -> int:
        return self.num_classes


class BertBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.dim)
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.p = cfg.dropout

    def forward(self, x):  # x: (B, L, D)
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)  # (B, H, L, Dh)
        x = self.attn_norm(x + self.drop(self.proj(y.transpose(1, 2).reshape(B, L, D))))  # post-LN
        return self.mlp_norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


@register_model("bidirectional-transformer")
class BidirectionalTransformer(nn.Module):
    config_class = TransformerConfig

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = cfg = config
        self.tok_embeddings = nn.Embedding(cfg.vocab_size + 1, cfg.dim)  # + mask token
        self.cls_embedding = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # + null class
        self.pos_embedding = nn.Parameter(torch.zeros(cfg.grid_size[0], cfg.grid_size[1], cfg.dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, cfg.dim))
        self.emb_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(BertBlock(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.dim, cfg.dim)
        self.head_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if not any(p.is_meta for p in self.parameters()):
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.trunc_normal_(m.weight, std=cfg.init_std)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
            nn.init.trunc_normal_(self.pos_embedding, std=cfg.init_std)

    @property
    def mask_token_id(self) -> int:
        return self.config.vocab_size

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def split_tokens(self, tokens):
        return tokens[..., None]

    def split_logits(self, logits):
        return [logits]

    def join_tokens(self, sub_tokens):
        return sub_tokens[..., 0]

    def forward(self, tokens, cond, grid=None, drop_cond=None, text_mask=None, return_hidden=False, positions=None):
        """tokens (B, h*w) with mask id at unknown positions, cond (B,) -> logits (B, h*w, vocab), or
        (M, vocab) at `positions` (M,), flat indices into the B*h*w positions (as LlamaGenerator)."""
        if positions is not None and return_hidden:
            raise ValueError("return_hidden and positions do not combine")
        h, w = grid = tuple(grid or self.config.grid_size)
        H, W = self.config.grid_size
        if h > H or w > W:
            raise ValueError(f"grid {h}x{w} exceeds the learned position table {H}x{W}")
        if tokens.shape[1] != h * w:
            raise ValueError(f"tokens must be (B, {h * w}) for grid {h}x{w}, got {tuple(tokens.shape)}")
        if drop_cond is None and self.training and self.config.class_dropout > 0:
            drop_cond = torch.rand(cond.shape, device=cond.device) < self.config.class_dropout
        if drop_cond is not None:
            cond = torch.where(drop_cond, torch.full_like(cond, self.config.num_classes), cond)
        pos = torch.cat([self.cls_pos, self.pos_embedding[:h, :w].reshape(h * w, -1)])  # (1 + N, D)
        x = torch.cat([self.cls_embedding(cond)[:, None], self.tok_embeddings(tokens)], 1) + pos  # (B, 1+N, D)
        x = self.drop(self.emb_norm(x))
        for layer in self.layers:
            x = layer(x)
        hid = self.head_norm(F.gelu(self.head(x[:, 1:])))  # (B, N, D)
        if positions is not None:
            hid = hid.reshape(-1, hid.shape[-1]).index_select(0, positions)  # (M, D)
        logits = hid @ self.tok_embeddings.weight[: self.config.vocab_size].T + self.output_bias  # (B, N, V) / (M, V)
        if positions is not None:
            return logits  # compute dtype, as LlamaGenerator
        return (logits.float(), hid) if return_hidden else logits.float()
