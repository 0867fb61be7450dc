"""Batched sampling for serving: several requests share each forward pass, each keeps its own RNG.

Dynamic batching must not change what a request gets: request j draws all its randomness from
its own generator `jobs[j].generator`, with the same calls and shapes as the library samplers
make for that request alone. With a batch-invariant forward (row i of a batched forward equals the
forward of row i alone, true for fp32 on CPU; tested), a request's tokens are exactly
`sample_maskgit` / `sample_ar` / `sample_fusion` run on that request alone with
`torch.Generator().manual_seed(seed)`, whatever else shares its batch.

Fusion across replicas: the AR stage hands its generator state to the MAR stage, so the two
stages consume one random stream, exactly like the in-process `sample_fusion`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from maskgil.sampling.ar import decode_raster
from maskgil.sampling.logits import cfg_scale_at, sample_tokens
from maskgil.sampling.maskgit import guided_logits, reveal_most_confident, start_tokens


@dataclass
class Job:
    """One request's rows in a batch."""

    cond: torch.Tensor  # (n,) long class ids, or (n, text_len, Dt) text features
    generator: torch.Generator
    init_tokens: torch.Tensor | None = None  # (n, h*w); mask id (or negative) = unknown
    text_mask: torch.Tensor | None = None  # (n, text_len) bool, with text features


def make_generator(device: torch.device | str, seed: int | None = None, state: torch.Tensor | None = None) -> torch.Generator:
    """A generator on `device`, seeded, or resumed from a state taken with `get_state()`."""
    g = torch.Generator(device=device)
    if state is not None:
        g.set_state(state)
    else:
        g.manual_seed(int(seed))
    return g


def _text_masks(jobs: list[Job], device) -> list[torch.Tensor] | None:
    """Per-job text masks, or None for class-conditional jobs. Text features must come padded to
    the model's text_len (`TextEncoder.encode(pad_to=...)`): then every batch has the same shapes
    and a request's rows are computed the same alone or batched."""
    if all(j.text_mask is None for j in jobs):
        return None
    if any(j.text_mask is None for j in jobs) or len({j.cond.shape[1:] for j in jobs}) != 1:
        raise ValueError("jobs in one batch must all carry text features of one shape (pad them to text_len)")
    return [j.text_mask.to(device) for j in jobs]


def _slices(jobs: list[Job]) -> list[slice]:
    out, start = [], 0
    for j in jobs:
        out.append(slice(start, start + len(j.cond)))
        start += len(j.cond)
    return out


@torch.no_grad()
def maskgit_batch(model, jobs: list[Job], grid: tuple[int, int], steps: int = 8, schedule: str = "cosine",
                  temperature: float = 1.0, top_k: int | None = None, choice_temperature: float = 4.5,
                  cfg_scale: float = 1.0, cfg_schedule: str = "constant",
                  compile: bool | str = False) -> list[torch.Tensor]:
    """MaskGIT decoding of several requests, one batched forward per step; returns (n_j, h*w) per job.

    Each step is `sample_maskgit`'s (`start_tokens`, `reveal_most_confident`) run per job with the
    job's generator; a job stops drawing random numbers when it has no unknown token left, as the
    single-request sampler stops its loop. `compile`: the forward runs through torch.compile."""
    mask_id = model.mask_token_id
    if mask_id is None:
        raise ValueError("MaskGIT decoding needs a masked (bidirectional) model")
    device = next(model.parameters()).device
    tokens, plans = [], []
    for j in jobs:
        t, plan = start_tokens(j.init_tokens, len(j.cond), tuple(grid), mask_id, steps, schedule, device)
        tokens.append(t)
        plans.append(plan)  # (n, T)
    conds = [j.cond.to(device) for j in jobs]
    masks = _text_masks(jobs, device)
    for i in range(steps):
        active = [k for k, t in enumerate(tokens) if (t == mask_id).any()]
        if not active:
            break
        progress = (i + 1) / steps
        x = torch.cat([tokens[k] for k in active])  # (B_active, N)
        c = torch.cat([conds[k] for k in active])
        tm = None if masks is None else torch.cat([masks[k] for k in active])
        logits = guided_logits(model, x, c, grid, cfg_scale_at(cfg_scale, progress, cfg_schedule), text_mask=tm,
                               compile=compile)  # (B_active, N, V)
        for k, sl in zip(active, _slices([jobs[k] for k in active])):
            g = jobs[k].generator
            sampled, logp = sample_tokens(model, logits[sl], temperature, top_k, generator=g)  # (n, N) each
            tokens[k], _ = reveal_most_confident(tokens[k], sampled, logp, plans[k][:, i], mask_id, progress,
                                                 choice_temperature, g)
    return tokens


@torch.no_grad()
def ar_batch(model, jobs: list[Job], grid: tuple[int, int], num_tokens: int, cfg_scale: float = 1.0,
             cfg_schedule: str = "constant", temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, compile: bool | str = False) -> list[torch.Tensor]:
    """Raster-order AR decoding of the first `num_tokens` tokens for several requests with one
    KV cache; returns (n_j, num_tokens) per job. The loop is `sample_ar`'s (`decode_raster`); only
    the draw differs: each job's rows come from its own generator. `compile`: as in `sample_ar`."""
    if not model.config.causal:
        raise ValueError("AR decoding needs a causal model")
    h, w = grid
    N = h * w
    if not 0 < num_tokens <= N:
        raise ValueError(f"num_tokens must be in [1, {N}], got {num_tokens}")
    device = next(model.parameters()).device
    cond = torch.cat([j.cond.to(device) for j in jobs])
    masks = _text_masks(jobs, device)
    slices = _slices(jobs)

    def draw(logits):  # (B, V) -> (B,): each job's rows from its own generator
        return torch.cat([sample_tokens(model, logits[sl], temperature, top_k, top_p, j.generator)[0]
                          for j, sl in zip(jobs, slices)])

    new = decode_raster(model, cond, tuple(grid), num_tokens, draw, cfg_scale, cfg_schedule,
                        text_mask=None if masks is None else torch.cat(masks), compile=compile)
    return [new[sl] for sl in slices]
