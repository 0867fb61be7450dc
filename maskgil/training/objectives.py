"""Training objectives on one batch of token grids: masked-token prediction and next-token prediction.

Both take the same batch (tokens (B, N) long, labels (B,) long, grid (h, w)) so the masked and the
causal generators train from the same shards. Randomness (which tokens to mask, which conditions
to drop for classifier-free guidance) comes from an explicit `torch.Generator`, so a step is a pure
function of (weights, batch, generator seed): a resumed run replays exactly what it would have done.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maskgil.sampling.schedules import training_mask_counts


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, mean over the scored tokens
    n_scored: int  # tokens that contributed (masked ones, or all for next-token)
    per_token: torch.Tensor  # (B, N) loss per position, 0 where not scored
    scored: torch.Tensor  # (B, N) bool, the positions the loss is taken on
    inputs: torch.Tensor  # (B, N) the tokens the model actually saw


def random_token_mask(batch: int, n_tokens: int, schedule: str = "cosine", generator=None) -> torch.Tensor:
    """(B, N) bool: for each sample exactly ceil(gamma(r) N) positions, chosen uniformly, r ~ U(0, 1)."""
    counts = training_mask_counts(batch, n_tokens, schedule, generator)  # (B,)
    scores = torch.rand(batch, n_tokens, generator=generator)
    rank = scores.argsort(dim=1).argsort(dim=1)  # rank of each position in a random order
    return rank < counts[:, None]


def condition_dropout(batch: int, p: float, generator=None) -> torch.Tensor:
    """(B,) bool: True where the condition is replaced by the null class (CFG training)."""
    if p <= 0:
        return torch.zeros(batch, dtype=torch.bool)
    return torch.rand(batch, generator=generator) < p


def _smoothed_ce(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-element cross-entropy (..., V) x (...) -> (...), computed in fp32."""
    V = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), label_smoothing=label_smoothing,
                           reduction="none").view(targets.shape)


def masked_token_loss(model, tokens: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int], *, mask_id: int,
                      class_dropout: float = 0.1, schedule: str = "cosine", label_smoothing: float = 0.1,
                      generator: torch.Generator | None = None, mask: torch.Tensor | None = None) -> LossOutput:
    """MaskGIL / MaskGIT objective: hide ceil(gamma(r) N) tokens, predict them, CE on hidden tokens only.

    `model` may be DDP/FSDP-wrapped, hence `mask_id` is passed explicitly. `mask` (B, N) bool
    overrides the random choice (tests)."""
    B, N = tokens.shape
    device = tokens.device
    if mask is None:
        mask = random_token_mask(B, N, schedule, generator).to(device)
    drop = condition_dropout(B, class_dropout, generator).to(device)
    inputs = tokens.masked_fill(mask, mask_id)  # (B, N): unknown positions hold the mask id
    logits = model(inputs, labels, grid, drop_cond=drop)  # (B, N, V)
    per_token = _smoothed_ce(logits, tokens, label_smoothing) * mask  # (B, N)
    n = int(mask.sum())
    return LossOutput(per_token.sum() / max(n, 1), n, per_token, mask, inputs)


def next_token_loss(model, tokens: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int], *,
                    class_dropout: float = 0.1, label_smoothing: float = 0.0,
                    generator: torch.Generator | None = None) -> LossOutput:
    """LlamaGen AR objective: logits[:, i] predicts token i from the condition and tokens < i."""
    B, N = tokens.shape
    drop = condition_dropout(B, class_dropout, generator).to(tokens.device)
    logits = model(tokens, labels, grid, drop_cond=drop)  # (B, N, V), shifted inside the model
    per_token = _smoothed_ce(logits, tokens, label_smoothing)  # (B, N)
    scored = torch.ones_like(tokens, dtype=torch.bool)
    return LossOutput(per_token.mean(), B * N, per_token, scored, tokens)


def compute_loss(model, config, tokens, labels, grid, *, schedule: str = "cosine", label_smoothing: float | None = None,
                 generator=None) -> LossOutput:
    """Pick the objective from the (unwrapped) model config: causal -> next token, else masked tokens."""
    if getattr(config, "causal", False):
        ls = 0.0 if label_smoothing is None else label_smoothing
        return next_token_loss(model, tokens, labels, grid, class_dropout=config.class_dropout, label_smoothing=ls,
                               generator=generator)
    ls = 0.1 if label_smoothing is None else label_smoothing
    return masked_token_loss(model, tokens, labels, grid, mask_id=config.mask_token_id,
                             class_dropout=config.class_dropout, schedule=schedule, label_smoothing=ls,
                             generator=generator)
