"""MaskGIT parallel decoding (the paper's sampler, 8 steps by default).

At step i of T every unknown token is sampled (temperature, top-k); its confidence is log p(sampled)
under the guided logits before temperature and top-k, plus Gumbel noise scaled by
choice_temperature * (1 - (i+1)/T); the most confident ones are revealed so that the
number still masked follows the schedule over the *initially unknown* tokens. Revealed and
pre-filled tokens never change.
"""
from __future__ import annotations

import torch

from maskgil.models.llama import check_class_ids
from maskgil.sampling.compiled import compiled_method
from maskgil.sampling.logits import cfg_combine, cfg_scale_at, check_sampling_args, sample_tokens
from maskgil.sampling.schedules import masked_after_steps


def guided_logits(model, tokens, cond, grid, scale: float, text_mask=None, compile: bool | str = False):
    """Logits (B, N, V) with classifier-free guidance, cond and uncond in one batched forward.

    `compile` runs the forward through torch.compile (`compiled_method`); class ids are then
    checked here, since a compiled graph cannot raise on values."""
    B = tokens.shape[0]
    forward = compiled_method(model, "forward", compile)
    if compile:
        if not cond.dtype.is_floating_point:
            check_class_ids(cond, model.config.num_classes)
        if hasattr(model, "rope"):  # fill the RoPE table cache outside the graph: inside, it costs a recompile
            model.rope(tuple(grid), tokens.device)
    no_drop = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    if scale == 1.0:
        return forward(tokens, cond, grid, drop_cond=no_drop, text_mask=text_mask)
    both = forward(torch.cat([tokens, tokens]), torch.cat([cond, cond]), grid,
                   drop_cond=torch.cat([no_drop, ~no_drop]),
                   text_mask=None if text_mask is None else torch.cat([text_mask, text_mask]))
    return cfg_combine(both[:B], both[B:], scale)


def gumbel_noise(shape, generator=None, device=None) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def sample_maskgit(model, cond, grid: tuple[int, int] | None = None, steps: int = 8, schedule: str = "cosine",
                   temperature: float = 1.0, top_k: int | None = None, choice_temperature: float = 4.5,
                   cfg_scale: float = 1.0, cfg_schedule: str = "constant", init_tokens: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, text_mask=None, trace: list | None = None,
                   compile: bool | str = False) -> torch.Tensor:
    """Decode a (B, h*w) token grid for conditions `cond` ((B,) class ids or (B, L, Dt) text features).

    `init_tokens` (B, h*w): pre-filled tokens are kept; positions holding the mask id (or any
    negative value) are unknown. `trace`, if a list, receives one dict per step for inspection.
    `compile` runs the model's forward through torch.compile (every step has the same shapes)."""
    mask_id = model.mask_token_id
    if mask_id is None:
        raise ValueError("MaskGIT decoding needs a masked (bidirectional) model")
    check_sampling_args(temperature, top_k, cfg_scale=cfg_scale, choice_temperature=choice_temperature)
    grid = tuple(grid or model.config.grid_size)
    tokens, plan = start_tokens(init_tokens, len(cond), grid, mask_id, steps, schedule,
                                next(model.parameters()).device)
    for i in range(steps):
        if not (tokens == mask_id).any():
            break
        progress = (i + 1) / steps
        logits = guided_logits(model, tokens, cond, grid, cfg_scale_at(cfg_scale, progress, cfg_schedule), text_mask,
                               compile)
        sampled, logp = sample_tokens(model, logits, temperature, top_k, generator=generator)  # (B, N) each
        tokens, reveal = reveal_most_confident(tokens, sampled, logp, plan[:, i], mask_id, progress,
                                               choice_temperature, generator)
        if trace is not None:
            trace.append({"step": i, "revealed": reveal, "tokens": tokens})
    return tokens


def start_tokens(init_tokens: torch.Tensor | None, batch: int, grid: tuple[int, int], mask_id: int, steps: int,
                 schedule: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid decoding starts from, (B, N), and its plan (B, T): how many tokens each sample
    still has masked after each step, over its *initially unknown* tokens."""
    N = grid[0] * grid[1]
    if init_tokens is None:
        tokens = torch.full((batch, N), mask_id, dtype=torch.long, device=device)
    else:
        if tuple(init_tokens.shape) != (batch, N):
            raise ValueError(f"init_tokens must be ({batch}, {N}), got {tuple(init_tokens.shape)}")
        tokens = torch.where(init_tokens < 0, mask_id, init_tokens).long().to(device)
    plan = [masked_after_steps(n, steps, schedule) for n in (tokens == mask_id).sum(1).tolist()]
    return tokens, torch.tensor(plan, device=device).view(batch, steps)


def reveal_most_confident(tokens, sampled, logp, still_masked, mask_id: int, progress: float,
                          choice_temperature: float, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One MaskGIT step: of the sampled unknown tokens keep the most confident, so that
    `still_masked` (B,) stay hidden. Confidence is log p(sampled) plus Gumbel noise annealed to
    zero with progress. Returns the new tokens (B, N) and which positions were revealed."""
    B, N = tokens.shape
    unknown = tokens == mask_id
    noise = gumbel_noise((B, N), generator, tokens.device) * (choice_temperature * (1.0 - progress))
    confidence = torch.where(unknown, logp + noise, torch.full_like(logp, float("-inf")))
    n_reveal = unknown.sum(1) - still_masked  # (B,)
    order = confidence.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=tokens.device).expand(B, N))
    reveal = unknown & (rank < n_reveal[:, None])
    return torch.where(reveal, sampled, tokens), reveal
