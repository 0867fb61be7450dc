"""Data-parallel wrapping (DDP or FSDP2) and world-size-independent state dicts.

Checkpoints always hold *full* (unsharded) state dicts keyed by parameter name, gathered with
`torch.distributed.checkpoint.state_dict`: the model file is a plain `save_pretrained` directory and
the optimizer state is keyed by FQN, so a run saved on 8 FSDP ranks restores on 2 DDP ranks or on
one process. The gather is a collective under FSDP, so every rank calls these functions.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

STRATEGIES = ("auto", "none", "ddp", "fsdp")
FULL_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Sizes the paper trains with FSDP: L/XL/XXL. B and the tiny presets fit DDP comfortably.
FSDP_PRESETS = ("maskgil-l", "maskgil-xl", "maskgil-xxl", "llamagen-l", "llamagen-xl", "llamagen-xxl")


def resolve_strategy(strategy: str, preset: str, world_size: int, use_gpu: bool) -> str:
    """'auto': FSDP for L/XL/XXL on GPUs, DDP otherwise; 'none' when there is a single process (an
    explicit 'none' needs one). An explicit 'fsdp' also runs on CPU workers (gloo), which is how the
    tests exercise it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "none" and world_size > 1:  # each worker would train its own copy on its share of the batch
        raise ValueError(f"strategy 'none' syncs no gradients: with {world_size} workers use 'auto', 'ddp' or 'fsdp'")
    if strategy == "auto":
        if world_size <= 1:
            return "none"
        return "fsdp" if (use_gpu and preset in FSDP_PRESETS) else "ddp"
    return strategy


def unwrap(model: nn.Module) -> nn.Module:
    """The user module under a DDP wrapper (FSDP2 modifies the module in place, nothing to strip)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_model(model: nn.Module, strategy: str, device: torch.device, precision: str = "fp32") -> nn.Module:
    """Move to `device` and wrap for data parallelism.

    FSDP2: each LLaMA block is its own `fully_shard` unit (all-gathered just before use, freed
    after), then the root (embeddings, head). bf16 runs as a MixedPrecisionPolicy (bf16 params and
    compute, fp32 gradient reduction and fp32 master weights in the optimizer)."""
    model = model.to(device)
    if strategy == "none":
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else None
        kw = {"mp_policy": mp} if mp is not None else {}
        for block in model.layers:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    raise ValueError(f"unknown strategy {strategy!r}")


def no_grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (all but the last)."""
    if not enabled:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 module

        @contextlib.contextmanager
        def _ctx():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return _ctx()
    return contextlib.nullcontext()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=FULL_CPU)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=FULL_CPU)


def load_full_state(model: nn.Module, model_state: dict, optimizer=None, optimizer_state: dict | None = None) -> None:
    """Load full state dicts into a (possibly sharded) model and optimizer; rank-count independent."""
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_state, options=opts)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


def init_single_process_group(device: torch.device) -> None:
    """A one-rank default process group on a free local port (nccl for a CUDA device, else gloo):
    FSDP2's collectives then run for real inside one process (benchmarks, GPU tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=device if cuda else None)


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
