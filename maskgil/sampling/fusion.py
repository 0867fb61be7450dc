"""Fusion decoding: an AR model writes the first k tokens (raster order), MAR completes the rest.

With k = 128 of 256 and m = 4 MAR steps the image takes 132 model steps instead of 256. k = 0 is
pure MAR, k = h*w pure AR. Both models must share the tokenizer (same vocabulary)."""
from __future__ import annotations

import torch

from maskgil.sampling.ar import sample_ar
from maskgil.sampling.maskgit import sample_maskgit


@torch.no_grad()
def sample_fusion(ar_model, mar_model, cond, grid: tuple[int, int] | None = None, ar_tokens: int = 128,
                  mar_steps: int = 4, cfg_scale: float = 1.0, cfg_schedule: str = "constant", temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, choice_temperature: float = 4.5,
                  schedule: str = "cosine", generator: torch.Generator | None = None, text_mask=None,
                  compile: bool | str = False) -> torch.Tensor:
    """AR writes tokens [0, ar_tokens) in raster order, MaskGIT completes the rest in `mar_steps`.

    One generator feeds both stages, AR first. `cfg_schedule` applies in each stage as its own
    sampler applies it (as served fusion does): AR at progress (position + 1) / h*w, MAR at
    (step + 1) / mar_steps. `top_p` is for the AR stage only (MaskGIT has none). Either model may be
    None when its stage writes nothing (k = 0: no AR; k = h*w: no MAR, the grid comes from AR).
    `compile` compiles the AR model's decode step and the MAR model's forward (`compiled_method`)."""
    if ar_model is None and mar_model is None:
        raise ValueError("fusion needs an AR model, a MAR model or both")
    grid = tuple(grid or (mar_model if mar_model is not None else ar_model).config.grid_size)
    N = grid[0] * grid[1]
    if ar_model is not None and mar_model is not None and ar_model.config.vocab_size != mar_model.config.vocab_size:
        raise ValueError("AR and MAR models must share a tokenizer (vocab sizes differ)")
    if not 0 <= ar_tokens <= N:
        raise ValueError(f"ar_tokens must be in [0, {N}], got {ar_tokens}")
    if ar_model is None and ar_tokens > 0:
        raise ValueError(f"ar_tokens={ar_tokens} needs an AR model (got None)")
    if mar_model is None and ar_tokens < N:
        raise ValueError(f"ar_tokens={ar_tokens} < {N} leaves tokens for MAR, but mar_model is None")
    prefix = None
    if ar_tokens > 0:
        prefix = sample_ar(ar_model, cond, grid, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                           temperature=temperature, top_k=top_k, top_p=top_p, num_tokens=ar_tokens,
                           generator=generator, text_mask=text_mask, compile=compile)
        if ar_tokens == N:
            return prefix
    device = next(mar_model.parameters()).device
    init = torch.full((len(cond), N), mar_model.mask_token_id, dtype=torch.long, device=device)
    if prefix is not None:
        init[:, :ar_tokens] = prefix
    return sample_maskgit(mar_model, cond, grid, steps=mar_steps, schedule=schedule, temperature=temperature,
                          top_k=top_k, choice_temperature=choice_temperature, cfg_scale=cfg_scale,
                          cfg_schedule=cfg_schedule, init_tokens=init, generator=generator, text_mask=text_mask,
                          compile=compile)
