"""The training loop as a library: config, optimizer and schedule, one optimizer step, checkpoints.

No Ray here: `pipelines/train.py` runs `fit` inside Ray Train workers, tests run it in-process.
The paper's settings are the defaults: AdamW lr 1e-4, betas (0.9, 0.96), weight decay 1e-5,
global batch 256 (split over workers, then into gradient-accumulation micro-batches).

Checkpoint = a `save_pretrained` directory (config.json + model.safetensors) plus `train_state.pt`
(optimizer, step, data position), loaded with `weights_only=True`. The learning-rate schedule is a
pure function of the step, and every random draw of a step (masks, condition dropout, dropout) is
seeded from (run seed, step, rank, micro-batch), so the step *is* the scheduler and RNG state.
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from maskgil.checkpoint import WEIGHTS_NAME, checked_fields, save_pretrained
from maskgil.precision import PRECISIONS, resolve_precision
from maskgil.sampling.schedules import SCHEDULES
from maskgil.seeding import hashed_seed
from maskgil.training.distributed import (STRATEGIES, full_model_state, full_optimizer_state, load_full_state,
                                          no_grad_sync, unwrap)
from maskgil.training.objectives import compute_loss, training_mask

TRAIN_STATE_NAME = "train_state.pt"
STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainConfig:
    """Everything a run needs besides data and hardware. YAML files in ray_configs/ map onto it."""

    preset: str = "maskgil-tiny"
    model_overrides: dict = field(default_factory=dict)  # e.g. vocab_size / num_classes from the shards
    max_steps: int = 1000
    global_batch: int = 256
    micro_batch: int | None = None  # per-worker forward batch; None = the whole per-worker batch
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.96)
    weight_decay: float = 1e-5
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    lr_schedule: str = "constant"  # "constant" | "cosine" (after warmup, down to min_lr_ratio * lr)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    mask_schedule: str = "cosine"  # training mask ratio law: "cosine" (paper) | "arccos" | "linear"
    label_smoothing: float | None = None  # None: 0.1 for masked models (paper), 0.0 for AR
    grid_schedule: list = field(default_factory=list)  # weak-to-strong: [[step, h, w], ...] ascending
    seed: int = 0
    precision: str = "fp32"  # "fp32" | "bf16" (autocast; FSDP2 mixed precision) | "auto" (bf16 where native)
    strategy: str = "auto"  # "auto" | "none" | "ddp" | "fsdp"
    compile: bool = False  # torch.compile each block and the loss (needs a C++ compiler on CPU)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end

    def __post_init__(self):
        """Reject values that would train wrongly without an error (a negative learning rate ascends,
        a negative clip norm turns clipping off) or fail only later inside a Ray worker."""
        self.betas = tuple(self.betas)
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.mask_schedule not in SCHEDULES:
            raise ValueError(f"mask_schedule must be one of {SCHEDULES}, got {self.mask_schedule!r}")
        if self.max_steps < 1 or self.global_batch < 1:
            raise ValueError("max_steps and global_batch must be >= 1")
        inf = math.inf  # (the comparisons below also reject NaN)
        _check_range("micro_batch", self.micro_batch, "null or an integer >= 1",
                     self.micro_batch is None or self.micro_batch >= 1)
        _check_range("lr", self.lr, "> 0", 0 < self.lr < inf)
        _check_range("min_lr_ratio", self.min_lr_ratio, "in [0, 1]", 0 <= self.min_lr_ratio <= 1)
        _check_range("warmup_steps", self.warmup_steps, ">= 0", self.warmup_steps >= 0)
        _check_range("weight_decay", self.weight_decay, ">= 0", 0 <= self.weight_decay < inf)
        _check_range("betas", list(self.betas), "two numbers in [0, 1)",
                     len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas))
        _check_range("grad_clip", self.grad_clip, ">= 0 (0 disables clipping)", self.grad_clip >= 0)
        _check_range("label_smoothing", self.label_smoothing, "null (the objective's default) or in [0, 1)",
                     self.label_smoothing is None or 0 <= self.label_smoothing < 1)
        _check_range("checkpoint_every", self.checkpoint_every, ">= 1", self.checkpoint_every >= 1)
        _check_range("keep_checkpoints", self.keep_checkpoints, ">= 1", self.keep_checkpoints >= 1)
        _check_range("log_every", self.log_every, ">= 1", self.log_every >= 1)
        _check_range("sample_every", self.sample_every, ">= 0 (0: only at the end)", self.sample_every >= 0)
        steps = [int(s[0]) for s in self.grid_schedule]
        if (any(len(s) != 3 or int(s[1]) < 1 or int(s[2]) < 1 for s in self.grid_schedule) or steps != sorted(steps)
                or (steps and steps[0] != 0)):
            raise ValueError(f"grid_schedule must be [[0, h, w], [step, h, w], ...] with ascending steps and "
                             f"h, w >= 1, got {self.grid_schedule}")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """From a run file's `train` section: errors name the key as it is written there (train.lr)."""
        fields = checked_fields(cls, data, "training config key", prefix="train.")
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"train.{e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_range(name: str, value, accepted: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


class NonFiniteLossError(RuntimeError):
    """Loss or gradient norm became NaN/inf; weights were not updated by the bad step."""


# ---------------------------------------------------------------------------- plan and schedules
def batch_plan(global_batch: int, world_size: int, micro_batch: int | None = None) -> tuple[int, int, int]:
    """(per-worker batch, micro batch, accumulation steps) so that workers x micro x accum = global."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {world_size} workers")
    per_worker = global_batch // world_size
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro batch must be >= 1, got {micro_batch}")
    micro = per_worker if micro_batch is None else min(micro_batch, per_worker)
    if per_worker % micro:
        raise ValueError(f"per-worker batch {per_worker} is not a multiple of micro batch {micro}")
    return per_worker, micro, per_worker // micro


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def grid_at(step: int, cfg: TrainConfig, default: tuple[int, int]) -> tuple[int, int]:
    """Token grid in use at `step` (weak-to-strong resolution schedule), else the model's default."""
    grid = tuple(default)
    for start, h, w in cfg.grid_schedule:
        if step >= start:
            grid = (int(h), int(w))
    return grid


def step_seed(seed: int, step: int, rank: int, micro: int, stream: str = "") -> int:
    """A seed unique to (run seed, step, rank, micro-batch[, stream]): replaying a step replays its
    masks (stream "") and its dropout (stream "dropout")."""
    return hashed_seed(f"{seed}/{step}/{rank}/{micro}" + (f"/{stream}" if stream else ""))


@contextmanager
def seeded_dropout(seed: int, device: torch.device):
    """Seed the generator that `nn.Dropout` draws from on `device` (the CPU's, or that GPU's) for one
    micro-batch, and put the caller's generator state back afterwards. Each rank then drops other
    activations (seeded once at start-up, all ranks would drop the same ones of their different
    rows), and a resumed run drops exactly what the uninterrupted one did without any saved state."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the run's betas; weight decay on every weight matrix and embedding table (null rows
    alike), none on biases and on the parameters of normalisation layers, whatever their shape
    (QK-Norm's per-head gains and biases are (heads, 1, head_dim)): decay would pull gains towards 0."""
    decay, no_decay = [], []
    for module in unwrap(model).modules():
        is_norm = type(module).__name__.endswith("Norm")  # LayerNorm, GroupNorm, RMSNorm, HeadNorm
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if is_norm or p.dim() < 2 or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step instead of a few per parameter tensor, where the weights are plain CUDA
    # tensors (FSDP2's sharded DTensors keep the default multi-tensor path).
    from torch.distributed.tensor import DTensor

    params = decay + no_decay
    fused = bool(params) and all(p.is_cuda and not isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def cpu_compile_available() -> bool:
    """Whether torch.compile can build CPU kernels here: inductor writes C++ and needs a compiler
    (CXX, g++, c++ or clang++) and the Python headers."""
    import os
    import sysconfig

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    return bool(cxx) and (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()


def compile_blocks(model: nn.Module) -> nn.Module:
    """torch.compile every block in place, before DDP/FSDP wrapping (the order FSDP2 supports): the
    norms, QK-Norm, RoPE and SwiGLU fuse around the matmuls. Identical blocks share one compiled
    graph; parameter names, hence checkpoints, do not change."""
    for block in model.layers:
        block.compile()
    return model


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    rank: int = 0, extra: dict | None = None) -> Path | None:
    """Write model + train_state to `path` (rank 0 writes; every rank must call: FSDP gathers)."""
    model_sd = full_model_state(model)
    optim_sd = full_optimizer_state(model, optimizer)
    if rank != 0:
        return None
    path = Path(path)
    base = unwrap(model)
    with torch.device("meta"):
        shell = type(base)(base.config)  # same class and config, weights assigned from the full state
    shell.load_state_dict(model_sd, assign=True)
    save_pretrained(shell, path, extra=extra)
    train_state = {
        "step": int(state["step"]), "epoch": int(state.get("epoch", 0)),
        "batches_in_epoch": int(state.get("batches_in_epoch", 0)),
        "optimizer": optim_sd,
    }
    tmp = path / (TRAIN_STATE_NAME + ".tmp")
    torch.save(train_state, tmp)
    tmp.replace(path / TRAIN_STATE_NAME)
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore weights (and optimizer) from a checkpoint dir; returns {'step', 'epoch', 'batches_in_epoch'}."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / WEIGHTS_NAME).is_file() or not (path / TRAIN_STATE_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (needs {WEIGHTS_NAME} and {TRAIN_STATE_NAME})")
    ts = torch.load(path / TRAIN_STATE_NAME, map_location="cpu", weights_only=True)
    load_full_state(model, load_file(str(path / WEIGHTS_NAME)), optimizer, ts["optimizer"] if optimizer else None)
    return {k: ts[k] for k in ("step", "epoch", "batches_in_epoch")}


def list_checkpoints(root: str | Path) -> list[Path]:
    """`step_XXXXXXXX` directories under root holding a complete checkpoint, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / TRAIN_STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints."""
    for p in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(p)


# ---------------------------------------------------------------------------- the step
class OutputNormProbe:
    """Forward hooks recording the mean L2 norm of the last block's output (the residual stream
    before the final norm: the paper's Figure 5c stability signal) and of the final normed states."""

    def __init__(self, model: nn.Module):
        base = unwrap(model)
        self.values: dict[str, float] = {}
        self.handles = []
        if hasattr(base, "layers") and len(base.layers):
            self.handles.append(base.layers[-1].register_forward_hook(self._hook("output_norm_prenorm")))
        final = getattr(base, "norm", None) or getattr(base, "head_norm", None)
        if final is not None:
            self.handles.append(final.register_forward_hook(self._hook("output_norm")))

    def _hook(self, name):
        def fn(module, args, out):
            self.values[name] = float(out.detach().float().norm(dim=-1).mean())
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def _to_device_batch(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tokens, condition, text mask): class ids from "label", or text features from "text"
    (added by `maskgil.text.with_text_features`)."""
    tokens = torch.as_tensor(batch["tokens"]).long().to(device, non_blocking=True)
    if "text" in batch:
        feats = torch.as_tensor(batch["text"]).float().to(device, non_blocking=True)
        return tokens, feats, torch.as_tensor(batch["text_mask"]).bool().to(device, non_blocking=True)
    if "label" not in batch:
        raise ValueError(f"a batch needs class labels or text features, it has {sorted(batch)}")
    return tokens, torch.as_tensor(batch["label"]).long().to(device, non_blocking=True), None


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict], cfg: TrainConfig,
               step: int, grid: tuple[int, int], rank: int = 0, world_size: int = 1,
               device: torch.device | str = "cpu") -> dict:
    """One optimizer step over `micro_batches` (gradient accumulation). `grid` is the stage's token
    grid; a micro-batch with a "grid" of its own (an aspect-ratio bucket) uses that. Raises
    NonFiniteLossError (without touching the weights) if the loss or the gradient norm is NaN/inf.

    The step's loss is the mean over every token it scores, on all `world_size` ranks (the ranks
    DDP / FSDP2 average gradients over): micro_batch and the worker count change how the global
    batch is computed, not how its tokens are weighted. A mean per micro-batch would weight a hidden
    token of a lightly masked row more than one of a heavily masked row whenever micro-batches differ
    in their mask counts. So every micro-batch's mask is drawn first (the same draws from the same
    generator as when the objective draws it), the count is summed over ranks (one scalar
    all-reduce), and each micro-batch backpropagates its summed token loss x world_size / count,
    which the wrappers' gradient average turns into sum / count. The returned "loss" is that
    global token mean."""
    base = unwrap(model)
    device = torch.device(device)
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, cfg)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=resolve_precision(cfg.precision, device) == "bf16" and cfg.strategy != "fsdp")
    plan, count = [], 0
    for i, batch in enumerate(micro_batches):
        tokens, cond, text_mask = _to_device_batch(batch, device)
        g = tuple(batch.get("grid") or grid)  # an aspect-ratio bucket's batch names its own grid
        if tokens.shape[1] != g[0] * g[1]:
            raise ValueError(f"batch holds {tokens.shape[1]} tokens per image but the grid at step {step} is "
                             f"{g[0]}x{g[1]}: feed shards of that resolution")
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, rank, i))
        mask = training_mask(base.config, tokens.shape[0], tokens.shape[1], cfg.mask_schedule, gen)  # None: causal
        count += tokens.numel() if mask is None else int(mask.sum())
        plan.append((tokens, cond, text_mask, g, gen, mask))
    if world_size > 1:  # a tensor from here on: no host sync before the forwards are queued
        count = torch.tensor(count, dtype=torch.float64, device=device)
        dist.all_reduce(count)
    scale = world_size / count  # float, or a 0-dim fp64 tensor (cast to the loss's fp32 at use)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (tokens, cond, text_mask, g, gen, mask) in enumerate(plan):
        dropout = seeded_dropout(step_seed(cfg.seed, step, rank, i, "dropout"), device)
        with no_grad_sync(model, enabled=i < len(plan) - 1), autocast, dropout:
            out = compute_loss(model, base.config, tokens, cond, g, schedule=cfg.mask_schedule,
                               label_smoothing=cfg.label_smoothing, generator=gen, compiled=cfg.compile,
                               text_mask=text_mask, mask=mask)
            (out.total * (scale.float() if torch.is_tensor(scale) else scale)).backward()
        loss_sum += out.total.detach().double()
    if world_size > 1:
        dist.all_reduce(loss_sum)
    loss = loss_sum / count
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    loss = float(loss)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"non-finite training signal at step {step}: loss={loss}, grad_norm={grad_norm}; "
                                 "the step was not applied")
    optimizer.step()
    return {"loss": loss, "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"]}


# ---------------------------------------------------------------------------- the loop
@dataclass
class Hooks:
    """Callbacks run by `fit`; every rank calls them (checkpointing is a collective under FSDP)."""

    on_log: Callable[[int, dict], None] | None = None  # (step, metrics) every cfg.log_every steps
    on_checkpoint: Callable[[int, dict, dict], None] | None = None  # (step, metrics, loop state)
    on_sample: Callable[[int], None] | None = None  # (step) every cfg.sample_every steps and at the end
    on_step_end: Callable[[int], None] | None = None  # (step) after each step (fault injection in tests)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
        data: Callable[[tuple[int, int], int], Iterable[dict]], *, micro_batch: int, accum: int,
        start: dict | None = None, rank: int = 0, world_size: int = 1, device="cpu",
        hooks: Hooks | None = None, progress: bool = False) -> dict:
    """Train from `start` (a loaded loop state, or step 0) until cfg.max_steps.

    `data(grid, epoch)` yields this worker's micro-batches ({"tokens": (b, N), "label": (b,)}, or
    "text" (b, L, Dt) and "text_mask" (b, L) instead of "label" for text-conditional models; a
    "grid" (h, w) when an aspect-ratio bucket's batch differs from the stage's grid) of one epoch,
    in a per-epoch shuffled order. The loop counts steps exactly: after a restart from a
    checkpoint at step s it runs steps s+1.. and skips the micro-batches of the epoch that step s
    had already consumed, so no step is lost or repeated. A weak-to-strong grid switch starts a
    fresh epoch of the new grid's data, also when the run resumes from a checkpoint saved right at
    the switch (its data position is still the previous grid's). With several ranks, an epoch ends on all
    of them when any runs out (bucketed data fills a different number of batches per rank), so
    every rank counts the same micro-batches. Returns the final loop state + metrics."""
    hooks = hooks or Hooks()
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, **(start or {})}
    default_grid = tuple(unwrap(model).config.grid_size)
    probe = OutputNormProbe(model)
    metrics: dict[str, Any] = {}
    # The grid of the last step taken, which the saved data position (epoch, batches_in_epoch) belongs
    # to: when the next step is a grid switch the loop below starts the new grid's epoch, as it does
    # without a restart. The iterator opens lazily so that the old grid's data is never read then.
    grid = grid_at(max(state["step"] - 1, 0), cfg, default_grid)
    iterator = None
    fresh_epoch, steps_in_epoch = state["batches_in_epoch"] == 0, 0  # a resumed epoch may be nearly done
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="train", unit="step")
    t_last, tokens_since = time.perf_counter(), 0

    def new_epoch():
        nonlocal iterator, fresh_epoch, steps_in_epoch
        state.update(epoch=state["epoch"] + 1, batches_in_epoch=0)
        iterator = _epoch_iter(data, grid, state)
        fresh_epoch, steps_in_epoch = True, 0

    try:
        while state["step"] < cfg.max_steps:
            step = state["step"]
            new_grid = grid_at(step, cfg, default_grid)
            if new_grid != grid:  # weak-to-strong switch: a fresh epoch from the new resolution's data
                grid = new_grid
                new_epoch()
            if iterator is None:
                iterator = _epoch_iter(data, grid, state)
            micro, ended = _next_micro_batches(iterator, accum, micro_batch, state)
            if world_size > 1:  # ranks may run out at different steps (bucketed data): all end the epoch together
                ended = _any_rank(ended, device)
            if ended:
                if fresh_epoch and steps_in_epoch == 0:
                    raise RuntimeError(f"an epoch ended before its first step: this worker had {len(micro)} full "
                                       f"micro-batches of {micro_batch} rows, fewer than one step needs ({accum})")
                new_epoch()  # (a Ray Data split starts its next epoch once every rank asks for it)
                continue
            metrics = train_step(model, optimizer, micro, cfg, step, grid, rank, world_size, device)
            state["step"] = step + 1
            steps_in_epoch += 1
            tokens_since += world_size * sum(int(b["tokens"].shape[0]) * int(b["tokens"].shape[1]) for b in micro)
            metrics.update(probe.values)
            metrics.update(step=state["step"], epoch=state["epoch"], grid_h=grid[0], grid_w=grid[1])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            last = state["step"] == cfg.max_steps
            if hooks.on_log and (state["step"] % max(cfg.log_every, 1) == 0 or last):
                now = time.perf_counter()
                metrics["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                hooks.on_log(state["step"], metrics)
            if hooks.on_sample and ((cfg.sample_every and state["step"] % cfg.sample_every == 0) or last):
                hooks.on_sample(state["step"])
            if hooks.on_checkpoint and (state["step"] % max(cfg.checkpoint_every, 1) == 0 or last):
                hooks.on_checkpoint(state["step"], metrics, dict(state))
            if hooks.on_step_end:
                hooks.on_step_end(state["step"])
    finally:
        probe.close()
        if bar is not None:
            bar.close()
    return {**state, **metrics}


def _next_micro_batches(iterator, accum: int, micro_batch: int, state: dict) -> tuple[list[dict], bool]:
    """Up to `accum` full micro-batches for one step, and whether the epoch ended first."""
    micro = []
    while len(micro) < accum:
        b = next(iterator, None)
        if b is None:
            return micro, True
        state["batches_in_epoch"] += 1
        if len(b["tokens"]) == micro_batch:  # a ragged tail batch is skipped (drop_last)
            micro.append(b)
    return micro, False


def _any_rank(flag: bool, device) -> bool:
    """True on every rank when `flag` is true on any (one tiny all-reduce)."""
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _epoch_iter(data, grid, state) -> Iterator[dict]:
    """Iterator over the current epoch, fast-forwarded past the micro-batches already consumed."""
    it = iter(data(grid, state["epoch"]))
    for _ in range(state["batches_in_epoch"]):
        next(it, None)
    return it
