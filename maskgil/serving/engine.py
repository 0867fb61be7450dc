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

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from maskgil.sampling.compiled import compiled_method
from maskgil.sampling.logits import cfg_combine, cfg_scale_at, sample_tokens
from maskgil.sampling.maskgit import guided_logits, gumbel_noise
from maskgil.sampling.schedules import masked_after_steps


@dataclass
class Job:
    """One request's rows in a batch."""

    cond: torch.Tensor  # (n,) long class ids
    generator: torch.Generator
    init_tokens: torch.Tensor | None = None  # (n, h*w); mask id (or negative) = unknown


def make_generator(device: torch.device | str, seed: int | None = None, state: torch.Tensor | None = None) -> torch.Generator:
    """A generator on `device`, seeded, or resumed from a state taken with `get_state()`."""
    g = torch.Generator(device=device)
    if state is not None:
        g.set_state(state)
    else:
        g.manual_seed(int(seed))
    return g


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

    Mirrors `maskgil.sampling.sample_maskgit` step for step (same schedule, confidence, reveal
    rule); a job stops drawing random numbers when it has no unknown token left, as the
    single-request sampler stops its loop. `compile`: the forward runs through torch.compile."""
    mask_id = model.mask_token_id
    if mask_id is None:
        raise ValueError("MaskGIT decoding needs a masked (bidirectional) model")
    h, w = grid
    N = h * w
    device = next(model.parameters()).device
    tokens, plans = [], []
    for j in jobs:
        n = len(j.cond)
        if j.init_tokens is None:
            t = torch.full((n, N), mask_id, dtype=torch.long, device=device)
        else:
            if tuple(j.init_tokens.shape) != (n, N):
                raise ValueError(f"init_tokens must be ({n}, {N}), got {tuple(j.init_tokens.shape)}")
            t = torch.where(j.init_tokens < 0, mask_id, j.init_tokens).long().to(device)
        tokens.append(t)
        plans.append(torch.tensor([masked_after_steps(int(c), steps, schedule) for c in (t == mask_id).sum(1)],
                                  device=device))  # (n, T)
    conds = [j.cond.to(device) for j in jobs]
    for i in range(steps):
        active = [k for k, t in enumerate(tokens) if (t == mask_id).any()]
        if not active:
            break
        progress = (i + 1) / steps
        x = torch.cat([tokens[k] for k in active])  # (B_active, N)
        c = torch.cat([conds[k] for k in active])
        logits = guided_logits(model, x, c, grid, cfg_scale_at(cfg_scale, progress, cfg_schedule),
                               compile=compile)  # (B_active, N, V)
        for k, sl in zip(active, _slices([jobs[k] for k in active])):
            g = jobs[k].generator
            sampled, logp = sample_tokens(model, logits[sl], temperature, top_k, generator=g)  # (n, N) each
            tokens[k] = _reveal(tokens[k], sampled, logp, plans[k][:, i], mask_id, progress, choice_temperature, g)
    return tokens


def _reveal(tokens, sampled, logp, still_masked, mask_id, progress, choice_temperature, generator):
    """One MaskGIT step for one request: of the sampled unknown tokens, keep the most confident."""
    B, N = tokens.shape
    unknown = tokens == mask_id
    noise = gumbel_noise((B, N), generator, tokens.device) * (choice_temperature * (1.0 - progress))
    confidence = torch.where(unknown, logp + noise, torch.full_like(logp, float("-inf")))
    n_reveal = unknown.sum(1) - still_masked  # (B,)
    order = confidence.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=tokens.device).expand(B, N))
    return torch.where(unknown & (rank < n_reveal[:, None]), sampled, tokens)


@torch.no_grad()
def ar_batch(model, jobs: list[Job], grid: tuple[int, int], num_tokens: int, cfg_scale: float = 1.0,
             cfg_schedule: str = "constant", temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, compile: bool | str = False) -> list[torch.Tensor]:
    """Raster-order AR decoding of the first `num_tokens` tokens for several requests with one
    KV cache; returns (n_j, num_tokens) per job. Mirrors `maskgil.sampling.sample_ar`; `compile`
    runs its decode step through torch.compile (`compiled_method`)."""
    if not model.config.causal:
        raise ValueError("AR decoding needs a causal model")
    h, w = grid
    N = h * w
    if not 0 < num_tokens <= N:
        raise ValueError(f"num_tokens must be in [1, {N}], got {num_tokens}")
    device = next(model.parameters()).device
    cond = torch.cat([j.cond for j in jobs]).to(device)
    B = len(cond)
    use_cfg = cfg_scale != 1.0
    rows = 2 if use_cfg else 1
    drop = torch.zeros(rows * B, dtype=torch.bool, device=device)
    drop[B:] = True
    slices = _slices(jobs)
    step = compiled_method(model, "decode_step", compile)
    seq_pos = torch.arange(N, device=device) + model.config.prefix_len
    model.setup_kv_cache(rows * B, grid)
    try:
        logits = model.prefill(torch.cat([cond] * rows), drop_cond=drop)  # (rows*B, V)
        out = []
        for pos in range(num_tokens):
            scale = cfg_scale_at(cfg_scale, (pos + 1) / N, cfg_schedule)
            l = cfg_combine(logits[:B], logits[B:], scale) if use_cfg else logits
            tok = torch.cat([sample_tokens(model, l[sl], temperature, top_k, top_p, j.generator)[0]
                             for j, sl in zip(jobs, slices)])  # (B,)
            out.append(tok)
            if pos + 1 < num_tokens:
                logits = step(torch.cat([tok] * rows)[:, None], seq_pos[pos:pos + 1])  # (rows*B, V)
    finally:
        if not compile:  # a compiled step keeps its cache for the next call (same buffers)
            model.clear_kv_cache()
    new = torch.stack(out, 1)  # (B, num_tokens)
    return [new[sl] for sl in slices]


# ----------------------------------------------------------------------------- images
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B,3,H,W) in [-1,1] -> uint8 (B,H,W,3)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H,W,3) -> PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def image_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """uint8 (B,H,W,3) -> one (rows*H + pad.., cols*W + pad.., 3) grid, ceil(sqrt(B)) columns."""
    B, H, W, C = images.shape
    cols = math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    out = np.zeros((rows * H + (rows - 1) * pad, cols * W + (cols - 1) * pad, C), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        out[r * (H + pad): r * (H + pad) + H, c * (W + pad): c * (W + pad) + W] = images[i]
    return out
