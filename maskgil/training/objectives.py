"""Training objectives on one batch of token grids: masked-token prediction and next-token prediction.

Both take the same batch (tokens (B, N) long, the condition: class ids (B,) long or text features
(B, L, Dt) with their mask (B, L), grid (h, w)) so the masked and the causal generators train from
the same shards. Randomness (which tokens to mask, which conditions
to drop for classifier-free guidance) comes from an explicit `torch.Generator`, so a step is a pure
function of (weights, batch, generator seed): a resumed run replays exactly what it would have done.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maskgil.sampling.schedules import training_mask_counts


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, mean over the scored tokens
    n_scored: int  # tokens that contributed (masked ones, or all for next-token)
    per_token: torch.Tensor  # (B, N) loss per position (detached), 0 where not scored
    scored: torch.Tensor  # (B, N) bool, the positions the loss is taken on
    inputs: torch.Tensor  # (B, N) the tokens the model actually saw
    # scalar, the sum over the scored tokens (with grad): the training step divides it by the step's
    # global count of scored tokens, so micro-batching and the worker count do not reweight tokens
    total: torch.Tensor


def random_token_mask(batch: int, n_tokens: int, schedule: str = "cosine", generator=None) -> torch.Tensor:
    """(B, N) bool: for each sample exactly ceil(gamma(r) N) positions, chosen uniformly, r ~ U(0, 1)."""
    counts = training_mask_counts(batch, n_tokens, schedule, generator)  # (B,)
    order = torch.rand(batch, n_tokens, generator=generator).argsort(dim=1)  # (B, N) positions, random order
    first = torch.arange(n_tokens) < counts[:, None]  # (B, N): the first count_b places of that order
    # Hide the positions in those places: one sort, no second argsort to rank them (on the host,
    # between GPU steps, this is idle device time).
    return torch.zeros(batch, n_tokens, dtype=torch.bool).scatter_(1, order, first)


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


@functools.cache
def _compiled_ce():
    return torch.compile(_smoothed_ce, dynamic=True)


def compiled_smoothed_ce(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """`_smoothed_ce` through torch.compile: log-softmax, the target pick and the smoothing term fuse
    into one pass over the (M, V) logits instead of several fp32 copies. Shapes are dynamic from the
    start because the number of hidden tokens changes every step."""
    return _compiled_ce()(logits, targets, label_smoothing)


def token_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, label_smoothing: float,
                        factorization: tuple[int, ...] = (), compiled: bool = False) -> torch.Tensor:
    """Per-token CE (...,) for logits (..., V). With factorised tokens (LFQ) the logits hold one head
    per sub-token and the loss is the sum of the sub-token cross-entropies (the code's log-likelihood
    factorises). `compiled` runs each cross-entropy through `compiled_smoothed_ce`."""
    ce = compiled_smoothed_ce if compiled else _smoothed_ce
    if not factorization:
        return ce(logits, tokens, label_smoothing)
    from maskgil.tokenizers.lfq import factorize_codes

    subs = factorize_codes(tokens, factorization)  # (..., S)
    parts = logits.split([2 ** b for b in factorization], dim=-1)
    return sum(ce(part, subs[..., j], label_smoothing) for j, part in enumerate(parts))


def masked_token_loss(model, tokens: torch.Tensor, cond: torch.Tensor, grid: tuple[int, int], *, mask_id: int,
                      class_dropout: float = 0.1, schedule: str = "cosine", label_smoothing: float = 0.1,
                      generator: torch.Generator | None = None, mask: torch.Tensor | None = None,
                      factorization: tuple[int, ...] = (), compiled: bool = False,
                      text_mask: torch.Tensor | None = None) -> LossOutput:
    """MaskGIL / MaskGIT objective: hide ceil(gamma(r) N) tokens, predict them, CE on hidden tokens only.

    `model` may be DDP/FSDP-wrapped, hence `mask_id` is passed explicitly. `mask` (B, N) bool
    overrides the random choice: tests, and the training step, which draws each micro-batch's mask
    first (`training_mask` on this same generator) to count the step's hidden tokens; the condition
    dropout then continues from the generator's state, as it does when the mask is drawn here."""
    B, N = tokens.shape
    device = tokens.device
    if mask is None:
        mask = random_token_mask(B, N, schedule, generator)  # drawn on the CPU: indices need no device sync
    positions = mask.reshape(-1).nonzero().squeeze(1).to(device)  # (M,) flat indices of the hidden tokens
    mask = mask.to(device)
    drop = condition_dropout(B, class_dropout, generator).to(device)
    inputs = tokens.masked_fill(mask, mask_id)  # (B, N): unknown positions hold the mask id
    logits = model(inputs, cond, grid, drop_cond=drop, positions=positions, text_mask=text_mask)  # (M, V): hidden only
    ce = token_cross_entropy(logits, tokens.reshape(-1)[positions], label_smoothing, factorization, compiled)  # (M,)
    n = positions.numel()
    per_token = torch.zeros(B * N, dtype=ce.dtype, device=device).index_copy_(0, positions, ce.detach())
    total = ce.sum()
    return LossOutput(total / max(n, 1), n, per_token.view(B, N), mask, inputs, total)


def next_token_loss(model, tokens: torch.Tensor, cond: torch.Tensor, grid: tuple[int, int], *,
                    class_dropout: float = 0.1, label_smoothing: float = 0.0,
                    generator: torch.Generator | None = None, factorization: tuple[int, ...] = (),
                    compiled: bool = False, text_mask: torch.Tensor | None = None) -> LossOutput:
    """LlamaGen AR objective: logits[:, i] predicts token i from the condition and tokens < i."""
    B, N = tokens.shape
    drop = condition_dropout(B, class_dropout, generator).to(tokens.device)
    logits = model(tokens, cond, grid, drop_cond=drop, text_mask=text_mask)  # (B, N, V), shifted inside the model
    per_token = token_cross_entropy(logits, tokens, label_smoothing, factorization, compiled)  # (B, N)
    scored = torch.ones_like(tokens, dtype=torch.bool)
    return LossOutput(per_token.mean(), B * N, per_token, scored, tokens, per_token.sum())


def training_mask(config, batch: int, n_tokens: int, schedule: str = "cosine", generator=None) -> torch.Tensor | None:
    """The (B, N) positions `compute_loss` will score, drawn from `generator` exactly as the masked
    objective draws them (pass the result back as its `mask`); None for a causal model, which scores
    every position. Lets the training step count a step's scored tokens before any forward."""
    if getattr(config, "causal", False):
        return None
    return random_token_mask(batch, n_tokens, schedule, generator)


def compute_loss(model, config, tokens, cond, grid, *, schedule: str = "cosine", label_smoothing: float | None = None,
                 generator=None, compiled: bool = False, text_mask=None, mask: torch.Tensor | None = None) -> LossOutput:
    """Pick the objective from the (unwrapped) model config: causal -> next token, else masked tokens.
    `mask` (masked models only): the hidden positions, from `training_mask` on the same generator."""
    fact = tuple(getattr(config, "factorization", ()))
    if getattr(config, "causal", False):
        if mask is not None:
            raise ValueError("a causal model scores every position: it takes no mask")
        ls = 0.0 if label_smoothing is None else label_smoothing
        return next_token_loss(model, tokens, cond, grid, class_dropout=config.class_dropout, label_smoothing=ls,
                               generator=generator, factorization=fact, compiled=compiled, text_mask=text_mask)
    ls = 0.1 if label_smoothing is None else label_smoothing
    return masked_token_loss(model, tokens, cond, grid, mask_id=config.mask_token_id,
                             class_dropout=config.class_dropout, schedule=schedule, label_smoothing=ls,
                             generator=generator, mask=mask, factorization=fact, compiled=compiled,
                             text_mask=text_mask)
