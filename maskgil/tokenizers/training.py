"""Tokenizer training as a library: losses, one optimisation step, resumable state, a loop.

Loss = recon (L1 or L2) + perceptual + quantizer terms (codebook + commitment, or LFQ entropy)
       + GAN hinge loss from a PatchGAN discriminator after `disc_start` steps (fixed or adaptive weight).
Adam, betas (0.9, 0.95), grad-norm clip 1.0, optional EMA of the tokenizer weights.

Used by `pipelines/train_tokenizer.py` (Ray Train workers) and directly by the quickstart:

    tok, history = train_tokenizer(default_train_config("llamagen-vq-tiny"), images_uint8, steps=1500)
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from maskgil.checkpoint import config_from_dict, config_to_dict
from maskgil.precision import CONV_MEMORY_FORMAT, PRECISIONS, resolve_precision
from maskgil.tokenizers.base import ImageTokenizer, load_tokenizer, to_model_input
from maskgil.tokenizers.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from maskgil.tokenizers.perceptual import build_perceptual
from maskgil.tokenizers.presets import build_tokenizer
from maskgil.seeding import hashed_seed
from maskgil.training.distributed import world

TRAIN_STATE_NAME = "train_state.pt"


@dataclass
class TokenizerTrainConfig:
    preset: str = "llamagen-vq-tiny"
    model_overrides: dict = field(default_factory=dict)  # VQConfig / LFQConfig fields to replace
    batch_size: int = 16
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    recon_loss: str = "l2"  # "l1" | "l2"
    recon_weight: float = 1.0
    perceptual: str = "auto"  # "auto" (LPIPS if weights given, else Inception features) | "lpips" | "inception" | "none"
    perceptual_weight: float = 1.0
    lpips_weights: str | None = None
    vgg16_weights: str | None = None
    quantizer_weight: float = 1.0  # scales the quantizer's own loss terms (codebook/commitment or entropy)
    disc_weight: float = 0.5  # 0 disables the GAN
    disc_start: int = 20000
    disc_adaptive: bool = False  # taming's ||grad nll|| / ||grad g|| balance at the decoder's last layer
    disc_ndf: int = 64
    disc_layers: int = 3
    disc_lr: float | None = None  # defaults to lr
    ema_decay: float = 0.0  # 0 = no EMA; e.g. 0.999
    dead_code_restart: int = 0  # every N steps, re-seed VQ codes unused since the last check (0 = off)
    crop_size: int = 0  # train on random crops of this size (fully convolutional: ~(H/crop)^2 cheaper steps); 0 = off
    code_noise: float = 0.0  # P(a decoder input code is swapped for a random one) in training; 0 = off
    precision: str = "fp32"  # "fp32" | "bf16" (autocast; the quantizer stays fp32) | "auto" (bf16 where native)
    seed: int = 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 <= self.code_noise < 1.0:
            raise ValueError(f"code_noise is a probability in [0, 1), got {self.code_noise}")
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip is a max gradient norm >= 0 (0: no clipping), got {self.grad_clip}")


# Preset-specific defaults. The tiny presets train at 64 px for minutes on 2 CPU cores: a 10x higher
# learning rate than the paper-scale 1e-4, dead-code restarts, and only the L2 + quantizer losses by
# default (the perceptual net costs ~35% step time on CPU and trades PSNR for texture; the GAN needs
# far more steps than a few minutes to help). Both are one flag away (`perceptual_weight`, `disc_weight`).
_TINY_TRAIN = dict(lr=1e-3, warmup_steps=50, batch_size=16, dead_code_restart=100, perceptual_weight=0.0,
                   disc_weight=0.0, disc_start=2000, disc_ndf=16, disc_layers=2)


def default_train_config(preset: str, **overrides: Any) -> TokenizerTrainConfig:
    """Training defaults for a preset (tiny presets get the CPU-minutes recipe); overrides win."""
    base = dict(_TINY_TRAIN) if preset.endswith("-tiny") else {}
    base.update(overrides)
    return TokenizerTrainConfig(preset=preset, **base)


# -- data --------------------------------------------------------------------------------------------
def batch_iterator(data: Any, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[Any]:
    """Endless batches from an image array/tensor (N,...) (shuffled each epoch), a map-style dataset
    (items are images or (image, ...) tuples), or an iterable that already yields batches (used as
    given). `start` skips that many batches of the seed's order without loading them, so a run
    resumed at step s sees the batches an uninterrupted run would have."""
    if isinstance(data, (np.ndarray, torch.Tensor)) or (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        n = len(data)
        if n == 0:
            raise ValueError("training data is empty")
        rng = np.random.default_rng(seed)
        b = min(batch_size, n)
        skip_epochs, skip = divmod(start, n // b)
        for _ in range(skip_epochs):
            rng.permutation(n)
        while True:
            order = rng.permutation(n)
            for i in range(skip * b, n - b + 1, b):
                idx = order[i : i + batch_size]
                if isinstance(data, (np.ndarray, torch.Tensor)):
                    yield data[idx]
                else:
                    items = [data[int(j)] for j in idx]
                    items = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
                    yield np.stack([np.asarray(it) for it in items])
            skip = 0
    else:
        yield from data


# -- the trainer -------------------------------------------------------------------------------------
def random_crops(x: torch.Tensor, size: int) -> torch.Tensor:
    """One random size x size crop per image: (B,C,H,W) -> (B,C,size,size) (global torch RNG)."""
    B, _, H, W = x.shape
    if size > min(H, W):
        raise ValueError(f"crop_size {size} is larger than the {H}x{W} training images")
    top = torch.randint(0, H - size + 1, (B,)).tolist()
    left = torch.randint(0, W - size + 1, (B,)).tolist()
    return torch.stack([x[i, :, t : t + size, l : l + size] for i, (t, l) in enumerate(zip(top, left))])


def _sync_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Average gradients over the process group (data parallel without a DDP wrapper, so the two
    backward passes of GAN training and the adaptive weight stay simple)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _broadcast_params(module: torch.nn.Module) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def _seed_rank_stream(seed: int, step: int) -> None:
    """Give ranks > 0 their own random stream (crops, code noise) for the run from `step` on; rank 0
    keeps the run seed's, so one process trains as before. Seeded alike, every rank would crop and
    noise its different images in the same way."""
    rank, _ = world()
    if rank:
        torch.manual_seed(hashed_seed(f"{seed}/rank{rank}/step{step}"))


class TokenizerTrainer:
    """Owns the tokenizer, discriminator, optimisers, EMA and step count; one `train_step` per batch."""

    def __init__(self, config: TokenizerTrainConfig, tokenizer: ImageTokenizer | None = None, device: str | torch.device = "cpu"):
        self.config = c = config
        self.device = torch.device(device)
        self.precision = resolve_precision(c.precision, self.device)  # what "auto" became here
        torch.manual_seed(c.seed)
        # Channels-last convolutions (maskgil.precision.CONV_MEMORY_FORMAT): 14 % per step for the tiny
        # preset on 2 CPU cores. Built tokenizers already are; one passed in may not be.
        self.model = (tokenizer or build_tokenizer(c.preset, **c.model_overrides)).to(
            self.device, memory_format=CONV_MEMORY_FORMAT)
        self.perceptual = build_perceptual(c.perceptual if c.perceptual_weight > 0 else "none",
                                           c.lpips_weights, c.vgg16_weights)
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        self.perceptual_name = getattr(self.perceptual, "name", "none")
        self.disc = (PatchDiscriminator(c.disc_ndf, c.disc_layers).to(self.device, memory_format=CONV_MEMORY_FORMAT)
                     if c.disc_weight > 0 else None)
        _broadcast_params(self.model)
        if self.disc is not None:
            _broadcast_params(self.disc)
        _seed_rank_stream(c.seed, 0)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
        self.opt_d = (torch.optim.Adam(self.disc.parameters(), lr=c.disc_lr or c.lr, betas=tuple(c.betas))
                      if self.disc is not None else None)
        self.ema = ({k: v.detach().clone() for k, v in self.model.state_dict().items()} if c.ema_decay > 0 else None)
        self.step = 0
        restartable = hasattr(getattr(self.model, "quantize", None), "restart_dead_codes")
        self.code_counts = (torch.zeros(self.model.codebook_size, dtype=torch.long, device=self.device)
                            if c.dead_code_restart and restartable else None)

    def _maybe_restart_dead_codes(self, codes: torch.Tensor) -> int:
        if self.code_counts is None:
            return 0
        self.code_counts += torch.bincount(codes.reshape(-1), minlength=self.code_counts.numel())
        if (self.step + 1) % self.config.dead_code_restart:
            return 0
        counts = self.code_counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        n = self.model.quantize.restart_dead_codes(counts == 0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(self.model.quantize.embedding.weight.data, src=0)
        self.code_counts.zero_()
        return n

    def consolidate_code_counts(self) -> None:
        """Before a checkpoint, on every rank: rank 0 takes the usage counts of all ranks and the
        others start from none, so the counts rank 0 saves are the run's and the next restart check
        sums each use once (only rank 0's were saved, then loaded on every rank)."""
        rank, size = world()
        if self.code_counts is not None and size > 1:
            dist.all_reduce(self.code_counts)
            if rank:
                self.code_counts.zero_()

    def _lr(self) -> float:
        c = self.config
        return c.lr * min(1.0, (self.step + 1) / c.warmup_steps) if c.warmup_steps else c.lr

    def _adaptive_weight(self, nll: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        last = self.model.last_layer_weight()
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g, last, retain_graph=True)[0]
        return (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def _autocast(self):
        """bf16 autocast for the convolutions when training in bf16 (weights and optimiser stay fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def losses(self, x: torch.Tensor):
        """Generator-side losses for float images x (B,3,H,W): (total, reconstruction, metrics)."""
        c = self.config
        rec, qlosses, codes = self.model(x, code_noise=c.code_noise)
        rec = rec.float()  # losses in fp32 under bf16 autocast too
        recon = F.l1_loss(rec, x) if c.recon_loss == "l1" else F.mse_loss(rec, x)
        perceptual = self.perceptual(rec, x).mean() if self.perceptual is not None else rec.new_zeros(())
        nll = c.recon_weight * recon + c.perceptual_weight * perceptual
        qloss = sum(qlosses.values()) * c.quantizer_weight
        total = nll + qloss
        m = {"recon": recon.item(), "perceptual": perceptual.item(), "mse": F.mse_loss(rec.detach(), x).item()}
        m.update({f"q_{k}": v.item() for k, v in qlosses.items()})
        if self.disc is not None and self.step >= c.disc_start:
            g = hinge_g_loss(self.disc(rec))
            w = self._adaptive_weight(nll, g) * c.disc_weight if c.disc_adaptive else torch.tensor(c.disc_weight)
            total = total + w * g
            m.update(gan_g=g.item(), gan_weight=float(w))
        m["batch_usage"] = codes.unique().numel() / self.model.codebook_size
        self._last_codes = codes.detach()
        return total, rec, m

    def train_step(self, images: Any) -> dict[str, float]:
        c = self.config
        x = to_model_input(images).to(self.device)
        if c.crop_size and c.crop_size < min(x.shape[-2:]):
            x = random_crops(x, c.crop_size)
        x = x.contiguous(memory_format=CONV_MEMORY_FORMAT)
        self.model.check_image_size(x.shape[-2], x.shape[-1])
        self.model.train()
        lr = self._lr()
        for group in self.opt.param_groups:
            group["lr"] = lr
        with self._autocast():
            total, rec, m = self.losses(x)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        _sync_grads(self.model.parameters())
        clip = c.grad_clip or float("inf")  # 0: no clipping (as for the generators), only the norm
        m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.opt.step()
        m["codes_restarted"] = self._maybe_restart_dead_codes(self._last_codes)
        if self.disc is not None and self.step >= c.disc_start:
            self.disc.train()
            with self._autocast():
                d = hinge_d_loss(self.disc(x), self.disc(rec.detach()))
            self.opt_d.zero_grad(set_to_none=True)
            d.backward()
            _sync_grads(self.disc.parameters())
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), clip)
            self.opt_d.step()
            m["gan_d"] = d.item()
        if self.ema is not None:
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    if v.is_floating_point() and k in self.ema and not k.endswith("codebook_used"):
                        self.ema[k].lerp_(v, 1.0 - c.ema_decay)
                    else:
                        self.ema[k].copy_(v)
        self.step += 1
        m.update(loss=total.item(), lr=lr, step=self.step)  # the lr this step used
        return m

    # -- checkpoints ---------------------------------------------------------------------------
    def final_model(self) -> ImageTokenizer:
        """The tokenizer to ship: EMA weights when EMA is on, else the live weights (eval mode)."""
        if self.ema is None:
            return self.model.eval()
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.ema)
        return model.eval()

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "config": config_to_dict(self.config),
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "disc": self.disc.state_dict() if self.disc is not None else None,
            "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "ema": self.ema,
            "code_counts": self.code_counts,
            "rng": torch.get_rng_state(),
            # crops run on the CPU generator, code noise on the training device's: both for an exact resume
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.disc is not None and state.get("disc") is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema = {k: v.to(self.device) for k, v in state["ema"].items()}
        if self.code_counts is not None and state.get("code_counts") is not None:
            # rank 0 saved every rank's counts (consolidate_code_counts): the others resume from none
            self.code_counts = state["code_counts"].to(self.device) * (0 if world()[0] else 1)
        if state.get("rng") is not None:  # generator states are CPU byte tensors, wherever the state was loaded
            torch.set_rng_state(state["rng"].cpu())
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.step = int(state["step"])
        _seed_rank_stream(self.config.seed, self.step)  # rank 0 saved its own generators only

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Checkpoint dir: the tokenizer as config.json + model.safetensors, plus train_state.pt to resume."""
        path = Path(path)
        self.final_model().save_pretrained(path, extra={"step": self.step, "perceptual": self.perceptual_name, **(extra or {})})
        torch.save(self.state_dict(), path / (TRAIN_STATE_NAME + ".tmp"))
        os.replace(path / (TRAIN_STATE_NAME + ".tmp"), path / TRAIN_STATE_NAME)
        self.model.train()
        return path

    @classmethod
    def resume(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "TokenizerTrainer":
        state = torch.load(Path(path) / TRAIN_STATE_NAME, map_location=device, weights_only=True)
        config = config_from_dict(TokenizerTrainConfig, state["config"])
        trainer = cls(config, tokenizer=load_tokenizer(path, map_location=device).train(), device=device)
        trainer.load_state_dict(state)
        return trainer


def train_tokenizer(config: TokenizerTrainConfig, data: Any, steps: int, tokenizer: ImageTokenizer | None = None,
                    trainer: TokenizerTrainer | None = None, log_every: int = 50, progress: bool = True,
                    callback: Callable[[TokenizerTrainer, dict], None] | None = None,
                    time_limit_s: float | None = None) -> tuple[ImageTokenizer, list[dict]]:
    """Train for `steps` steps (or until this call has run `time_limit_s`) on `data` (see
    `batch_iterator`; a resumed `trainer` continues the uninterrupted run's batch order).

    Returns (final tokenizer in eval mode, logged metric dicts every `log_every` steps).
    `callback(trainer, metrics)` runs after each logged step (MLflow logging, checkpoints).
    Pass `trainer` to continue a resumed run.
    """
    from tqdm.auto import tqdm

    trainer = trainer or TokenizerTrainer(config, tokenizer)
    batches = batch_iterator(data, config.batch_size, seed=config.seed, start=trainer.step)
    history, start = [], time.time()
    bar = tqdm(total=steps, initial=trainer.step, disable=not progress, desc=f"train {config.preset}")
    while trainer.step < steps:
        try:
            batch = next(batches)
        except StopIteration:
            raise ValueError(f"training data ran out after {trainer.step} steps (wanted {steps})") from None
        m = trainer.train_step(batch)
        bar.update(1)
        out_of_time = time_limit_s is not None and time.time() - start > time_limit_s
        if trainer.step % log_every == 0 or trainer.step == steps or out_of_time:
            m["elapsed_s"] = time.time() - start
            m["usage_window"] = trainer.model.codebook_usage()
            history.append(m)
            bar.set_postfix(loss=f"{m['loss']:.4f}", mse=f"{m['mse']:.4f}")
            if callback is not None:
                callback(trainer, m)
        if out_of_time:
            break
    bar.close()
    return trainer.final_model(), history


def save_recon_grid(tokenizer: ImageTokenizer, images: Any, path: str | os.PathLike, max_images: int = 8,
                    scale: int = 2) -> Path:
    """PNG: originals on the top row, reconstructions below (nearest-neighbour upscaled by `scale`)."""
    from PIL import Image

    x = to_model_input(images)[:max_images]
    rec = tokenizer.reconstruct(x).cpu()
    rows = [torch.cat(list(t), dim=2) for t in (x, rec)]  # each (3, H, n*W)
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
