"""Autoregressive raster-order decoding with a preallocated KV cache (LlamaGen-style AR)."""
from __future__ import annotations

import torch

from maskgil.sampling.compiled import compiled_method
from maskgil.sampling.logits import cfg_combine, cfg_scale_at, check_sampling_args, sample_tokens


@torch.no_grad()
def sample_ar(model, cond, grid: tuple[int, int] | None = None, cfg_scale: float = 1.0,
              cfg_schedule: str = "constant", temperature: float = 1.0, top_k: int | None = None,
              top_p: float | None = None, prefix_tokens: torch.Tensor | None = None, num_tokens: int | None = None,
              generator: torch.Generator | None = None, text_mask=None, compile: bool | str = False) -> torch.Tensor:
    """Sample image tokens in raster order; returns (B, n_prefix + num_tokens).

    With `prefix_tokens` (B, k) the model continues after them; `num_tokens` defaults to the rest of
    the grid. CFG runs cond and uncond rows in one batch: l_u + s (l_c - l_u). Greedy: top_k=1.
    `compile` runs each one-token step through torch.compile (`compiled_method`): the first
    call pays the compilation; later steps launch a few fused kernels instead of dozens of small
    ones, and the KV cache stays allocated for the next call of the same shape."""
    if not model.config.causal:
        raise ValueError("AR decoding needs a causal model")
    check_sampling_args(temperature, top_k, top_p, cfg_scale=cfg_scale)
    h, w = grid = tuple(grid or model.config.grid_size)
    N = h * w
    k0 = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    n_new = N - k0 if num_tokens is None else num_tokens
    if not 0 <= k0 + n_new <= N:
        raise ValueError(f"prefix {k0} + {n_new} new tokens exceeds the {N}-token grid")
    draw = lambda logits: sample_tokens(model, logits, temperature, top_k, top_p, generator)[0]  # noqa: E731
    new = decode_raster(model, cond, grid, n_new, draw, cfg_scale, cfg_schedule, prefix_tokens, text_mask, compile)
    return new if k0 == 0 else torch.cat([prefix_tokens.to(new.device), new], 1)


def decode_raster(model, cond, grid: tuple[int, int], n_new: int, draw, cfg_scale: float = 1.0,
                  cfg_schedule: str = "constant", prefix_tokens: torch.Tensor | None = None, text_mask=None,
                  compile: bool | str = False) -> torch.Tensor:
    """The KV-cache loop behind `sample_ar` and the serving engine: (B, n_new) new tokens.

    Pre-fills the condition (and `prefix_tokens` (B, k), if given), then writes positions k..k+n_new-1
    one at a time. `draw` turns guided logits (B, V) into tokens (B,): it owns the randomness, so
    a caller decides which generator serves which rows. CFG runs cond and uncond rows in one batch."""
    N, B = grid[0] * grid[1], len(cond)
    device = next(model.parameters()).device
    k0 = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    use_cfg = cfg_scale != 1.0
    rows = 2 if use_cfg else 1
    drop = torch.zeros(rows * B, dtype=torch.bool, device=device)
    drop[B:] = True
    step = compiled_method(model, "decode_step", compile)
    seq_pos = torch.arange(N, device=device) + model.config.prefix_len  # image position -> sequence position
    model.setup_kv_cache(rows * B, grid)
    try:
        logits = model.prefill(torch.cat([cond.to(device)] * rows), drop_cond=drop,
                               text_mask=None if text_mask is None else torch.cat([text_mask] * rows))  # (rows*B, V)
        if k0:
            logits = model.decode_tokens(torch.cat([prefix_tokens.to(device)] * rows), 0)
        out = []
        for pos in range(k0, k0 + n_new):
            scale = cfg_scale_at(cfg_scale, (pos + 1) / N, cfg_schedule)
            tok = draw(cfg_combine(logits[:B], logits[B:], scale) if use_cfg else logits)  # (B,)
            out.append(tok)
            if pos + 1 < k0 + n_new:
                logits = step(torch.cat([tok] * rows)[:, None], seq_pos[pos:pos + 1])  # (rows*B, V)
    finally:
        if not compile:  # a compiled step keeps its cache for the next call (same buffers)
            model.clear_kv_cache()
    return torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long, device=device)
