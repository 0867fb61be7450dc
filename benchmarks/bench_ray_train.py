"""What Ray Train costs on top of plain DDP, in one run: the same training step on the same ranks,
once as `torch.multiprocessing` + gloo and once as a Ray Train `TorchTrainer`, interleaved. JSON out.

    python benchmarks/bench_ray_train.py                      # the quickstart's MaskGIL: tiny, dim 128, 2 x 32
    python benchmarks/bench_ray_train.py --rounds 3 --steps 200

Both sides run `maskgil.training.train_step` on synthetic token batches (no Ray Data, so the
figure isolates the Train worker environment) with one torch thread per rank. Per side and round:
the median step time after 10 warm-up steps, the first step's time, and for Ray Train the seconds
from `fit()` to the first line of the training function (controller, worker processes, gloo).
The quickstart's full generator stage adds Ray Data (dataset materialization, the streaming split)
on top; its step times are in MLflow (`tokens_per_s`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_steps(rank: int, world: int, args: dict) -> dict:
    """The timed loop both sides run (model init seeded alike on every rank, as in training)."""
    import torch

    from maskgil.models import build_model
    from maskgil.training import TrainConfig, build_optimizer, train_step
    from maskgil.training.distributed import wrap_model

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    base = build_model(args["preset"], dim=args["dim"], multiple_of=32, vocab_size=args["vocab"])
    grid, classes = tuple(base.config.grid_size), base.config.num_classes
    model = wrap_model(base, "ddp", torch.device("cpu")) if world > 1 else base
    cfg = TrainConfig.from_dict({"preset": args["preset"], "lr": 1e-3, "label_smoothing": 0.1})
    optimizer = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(args["steps"]):
        batch = {"tokens": torch.randint(0, args["vocab"], (args["batch"], grid[0] * grid[1]), generator=gen),
                 "label": torch.randint(0, classes, (args["batch"],), generator=gen)}
        t = time.perf_counter()
        train_step(model, optimizer, [batch], cfg, step, grid, rank, world)
        times.append(time.perf_counter() - t)
    return {"median_step_s": statistics.median(times[10:]), "first_step_s": times[0]}


def _plain_rank(rank: int, world: int, args: dict, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = run_steps(rank, world, args)
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def plain_ddp(args: dict, port: int, poll_s: float = 1.0) -> dict:
    """Rank 0's timings. Polls the result queue and the ranks: if a rank exits without rank 0's
    result (an exception, a kill), the others are stopped and this raises instead of waiting forever."""
    import queue as queue_mod

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_plain_rank, args=(r, args["workers"], args, port, queue)) for r in range(args["workers"])]
    for p in procs:
        p.start()
    try:
        while True:
            try:
                out = queue.get(timeout=poll_s)
                break
            except queue_mod.Empty:
                pass
            failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError("plain DDP: " + ", ".join(f"rank {r} exited with code {c}" for r, c in failed)
                                   + " before rank 0 reported (any traceback is on stderr above)")
            if all(p.exitcode == 0 for p in procs):
                try:  # rank 0 put its result before exiting: take what the queue still holds
                    out = queue.get(timeout=poll_s)
                    break
                except queue_mod.Empty:
                    raise RuntimeError("plain DDP: every rank exited cleanly but rank 0 reported nothing") from None
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        raise
    for p in procs:
        p.join()
    return out


def _train_fn(config: dict) -> None:
    import ray.train

    started = time.time()
    ctx = ray.train.get_context()
    out = run_steps(ctx.get_world_rank(), ctx.get_world_size(), config["args"])
    if ctx.get_world_rank() == 0:
        Path(config["result"]).write_text(json.dumps({**out, "train_fn_started": started}))


def ray_train(args: dict, storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    result = Path(storage) / f"result_{time.time_ns()}.json"
    trainer = TorchTrainer(
        _train_fn, train_loop_config={"args": args, "result": str(result)}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=args["workers"], resources_per_worker={"CPU": args["cpus_per_worker"]}),
        run_config=RunConfig(name=result.stem, storage_path=storage))
    t0 = time.time()
    trainer.fit()
    out = json.loads(result.read_text())
    out["startup_s"] = out.pop("train_fn_started") - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="maskgil-tiny")
    p.add_argument("--dim", type=int, default=128, help="model width (the quickstart's MaskGIL: 128)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=32, help="per-rank batch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="as the quickstart's configs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--steps", type=int, default=150, help="steps per side and round (> 10: the median is "
                   "over the steps after 10 warm-up steps)")
    p.add_argument("--rounds", type=int, default=2, help="plain/Ray pairs, interleaved")
    a = p.parse_args()
    if a.steps <= 10:
        p.error("--steps must be > 10 (the median is taken after 10 warm-up steps)")
    args = {"preset": a.preset, "dim": a.dim, "vocab": a.vocab, "batch": a.batch, "workers": a.workers,
            "cpus_per_worker": a.cpus_per_worker, "threads": a.threads, "steps": a.steps}

    import ray

    from maskgil.cluster import init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray("local", include_dashboard=False, log_to_driver=False, logging_level="warning")
    rounds = []
    try:
        with tempfile.TemporaryDirectory() as storage:
            for i in range(a.rounds):
                plain = plain_ddp(args, port=29600 + i)
                in_ray = ray_train(args, storage)
                rounds.append({"plain_ddp": plain, "ray_train": in_ray,
                               "ratio": in_ray["median_step_s"] / plain["median_step_s"]})
    finally:
        ray.shutdown()
    best_plain = min(r["plain_ddp"]["median_step_s"] for r in rounds)
    best_ray = min(r["ray_train"]["median_step_s"] for r in rounds)
    print(json.dumps({"config": args, "cpu_count": os.cpu_count(), "rounds": rounds,
                      "best_plain_ddp_step_s": best_plain, "best_ray_train_step_s": best_ray,
                      "ray_train_over_plain": best_ray / best_plain}, indent=1))


if __name__ == "__main__":
    main()
