"""FSDP2 (`fully_shard`) on 2 CPU ranks over gloo: the sharded step is the same computation as DDP's,
also with compiled blocks (`train.compile`), and its checkpoint restores into one unsharded process
(a different worker count)."""
import faulthandler
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maskgil.models import build_model
from maskgil.training import TrainConfig, build_optimizer, compile_blocks, cpu_compile_available, train_step
from maskgil.training.distributed import full_optimizer_state, resolve_strategy, wrap_model
from maskgil.training.loop import load_checkpoint, save_checkpoint

STEPS, WORLD = 4, 2


def _model():
    torch.manual_seed(0)
    return build_model("maskgil-tiny", vocab_size=512, num_classes=16, grid_size=(8, 8), dim=64, multiple_of=32)


def _worker(rank: int, strategy: str, compiled: bool, port: int, out: str):
    faulthandler.enable(all_threads=True)  # a native crash in a rank prints its Python stacks to the captured stderr
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        if compiled:  # the order ray_trainer uses: compile the blocks, then shard them
            from torch._inductor import config as inductor_config

            inductor_config.compile_threads = 1  # 2 ranks on 2 cores: no compile-worker pool per rank
            compile_blocks(model)
        model = wrap_model(model, strategy, torch.device("cpu"))
        cfg = TrainConfig(preset="maskgil-tiny", global_batch=16, strategy=strategy, lr=3e-3, compile=compiled)
        opt = build_optimizer(model, cfg)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own half of the batch
        micro = [{"tokens": torch.randint(0, 512, (4, 64), generator=g), "label": torch.randint(0, 16, (4,), generator=g)}
                 for _ in range(2)]  # two micro-batches: the no-gradient-sync path runs too
        for step in range(STEPS):
            train_step(model, opt, micro, cfg, step, (8, 8), rank=rank, world_size=WORLD)
        save_checkpoint(out, model, opt, {"step": STEPS}, rank=rank)
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without interpreter teardown. A gloo rank here occasionally aborts while
    # the interpreter shuts down ("terminate called without an active exception", no Python frame
    # left; 2 of ~40 runs, with and without compile), and the parent then kills the other rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restore(path):
    model = _model()
    opt = build_optimizer(model, TrainConfig(preset="maskgil-tiny", lr=3e-3))
    assert load_checkpoint(path, model, opt)["step"] == STEPS
    return model, opt


def test_explicit_fsdp_is_allowed_on_cpu_and_auto_stays_ddp():
    assert resolve_strategy("fsdp", "maskgil-tiny", 2, use_gpu=False) == "fsdp"
    assert resolve_strategy("auto", "maskgil-l", 2, use_gpu=False) == "ddp"
    assert resolve_strategy("auto", "maskgil-l", 2, use_gpu=True) == "fsdp"


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    not cpu_compile_available(), reason="torch.compile (inductor) needs a C++ compiler"))])
def test_fsdp2_on_two_cpu_ranks_matches_ddp_and_restores_on_one(tmp_path, compiled):
    for strategy in ("ddp", "fsdp"):  # compiled: both compiled (Adam turns kernel rounding on near-zero grads into +-lr)
        mp.spawn(_worker, args=(strategy, compiled, _free_port(), str(tmp_path / strategy)), nprocs=WORLD, join=True)
    ddp, ddp_opt = _restore(tmp_path / "ddp")
    fsdp, fsdp_opt = _restore(tmp_path / "fsdp")
    start = _model().state_dict()
    # Compiled, the two strategies fuse and reduce in different orders. The gradients still agree
    # (exp_avg below, to 1e-6), but Adam's step m/sqrt(v) turns the rounding of a near-zero
    # gradient element into up to +-lr: seen 2.9e-5 on one k_norm.bias element (lr 3e-3) on
    # one CPU. A wrong update or a missing gradient sync would move weights by O(lr) instead.
    atol = 1e-4 if compiled else 1e-5
    for k, v in ddp.state_dict().items():
        torch.testing.assert_close(fsdp.state_dict()[k], v, rtol=1e-4, atol=atol, msg=k)
    assert any(not torch.equal(v, start[k]) for k, v in ddp.state_dict().items())  # training moved the weights
    a, b = full_optimizer_state(ddp, ddp_opt)["state"], full_optimizer_state(fsdp, fsdp_opt)["state"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k]["exp_avg"], a[k]["exp_avg"], rtol=1e-4, atol=1e-6)
