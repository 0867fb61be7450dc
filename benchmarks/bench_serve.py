"""Load-test the served app on loopback: requests/s and p50/p99 latency for MAR-only, AR-only and
fusion requests at several concurrencies, with dynamic batching on and off, in one run. JSON out.

    python benchmarks/bench_serve.py                       # tiny presets, random weights
    python benchmarks/bench_serve.py --mar DIR --ar DIR --tokenizer DIR --out bench_serve.json
    python benchmarks/bench_serve.py --compare-compile     # + replicas with `compile: true`

Goal (issue 7): with batching, MAR throughput at concurrency 32 >= 4x concurrency 1 on the tiny
preset, with zero failed requests. Each cell is bounded by a request count and a time limit.
--mar, --ar and --tokenizer go together (all three or none: none means random tiny checkpoints).
Per cell, from each request's X-Timings: `stage_compute_ms_per_request` is each generator stage's
(AR, MAR) replica batch compute time shared out over the requests in its batch, and
`model_compute_ms_per_request` their sum (fusion: AR + MAR; the decoder is not included);
`mean_batch_requests` is per stage too (`stage_mean_batch_requests`), the top-level figure being
the last generator stage's (`batch_stage`: MAR for MAR and fusion requests, AR for AR ones).
"""
import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = {  # request bodies per mode (8x8 tokens on the tiny presets)
    "mar": {"ar_share": 0.0, "steps": 8},
    "ar": {"ar_share": 1.0},
    "fusion": {"ar_share": 0.5, "steps": 4},
}


def tiny_checkpoints(root: Path) -> dict:
    import torch

    from maskgil.checkpoint import save_pretrained
    from maskgil.models import build_model
    from maskgil.tokenizers import build_tokenizer

    torch.manual_seed(0)
    save_pretrained(build_model("maskgil-tiny"), root / "maskgil")
    save_pretrained(build_model("llamagen-tiny"), root / "llamagen")
    build_tokenizer("llamagen-vq-tiny").save_pretrained(root / "tokenizer")
    return {"mar": str(root / "maskgil"), "ar": str(root / "llamagen"), "tokenizer": str(root / "tokenizer")}


async def run_cell(url: str, body: dict, concurrency: int, n_requests: int, max_seconds: float) -> dict:
    """`concurrency` closed-loop clients share `n_requests`; stop early after `max_seconds`."""
    import httpx

    latencies, failures = [], []
    batch_sizes, compute_per_request = {"ar": [], "mar": []}, {"ar": [], "mar": []}  # per generator stage
    next_id = 0
    deadline = time.perf_counter() + max_seconds

    async def client(c):
        nonlocal next_id
        while next_id < n_requests and time.perf_counter() < deadline:
            i = next_id
            next_id += 1
            t0 = time.perf_counter()
            try:
                r = await c.post(url, json={**body, "class_id": i % 16, "seed": i})
                ok = r.status_code == 200
            except httpx.HTTPError as e:
                ok, r = False, e
            dt = time.perf_counter() - t0
            if ok:
                latencies.append(dt)
                timings = json.loads(r.headers["x-timings"])
                for stage in ("ar", "mar"):  # fusion requests run both
                    if stage in timings:
                        batch_sizes[stage].append(timings[stage]["batch_requests"])
                        # the replica's batch compute time shared out over the requests in the batch
                        compute_per_request[stage].append(timings[stage]["compute_ms"] / timings[stage]["batch_requests"])
            else:
                failures.append(getattr(r, "status_code", type(r).__name__))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    stages = [s for s in ("ar", "mar") if batch_sizes[s]]
    stage_batch = {s: round(float(np.mean(batch_sizes[s])), 2) for s in stages}
    stage_compute = {s: round(float(np.mean(compute_per_request[s])), 1) for s in stages}
    return {"concurrency": concurrency, "requests": len(latencies), "failed": len(failures),
            "failures": sorted(set(map(str, failures))), "wall_s": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 3) if wall else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "batch_stage": stages[-1] if stages else None,
            "mean_batch_requests": stage_batch[stages[-1]] if stages else None,
            "stage_mean_batch_requests": stage_batch, "stage_compute_ms_per_request": stage_compute,
            "model_compute_ms_per_request": round(sum(stage_compute.values()), 1) if stages else None}


def engine_scaling(mar_path: str, batch_sizes=(1, 8, 32), cfg_scale: float = 2.0, repeats: int = 1) -> list[dict]:
    """Model compute alone (no Serve), one thread: ms per request when B requests share each
    forward. The ratio at B=1 vs B=32 bounds what batching can buy on this hardware."""
    import torch

    from maskgil.checkpoint import load_pretrained
    from maskgil.serving.engine import Job, make_generator, maskgit_batch

    torch.set_num_threads(1)
    model = load_pretrained(mar_path)
    grid = tuple(model.config.grid_size)
    jobs = lambda B: [Job(torch.tensor([i % 16]), make_generator("cpu", i)) for i in range(B)]  # noqa: E731
    maskgit_batch(model, jobs(1), grid, steps=8, cfg_scale=cfg_scale)  # warm-up
    out = []
    for B in batch_sizes:
        t0 = time.perf_counter()
        for _ in range(repeats):
            maskgit_batch(model, jobs(B), grid, steps=8, cfg_scale=cfg_scale)
        ms = (time.perf_counter() - t0) / repeats * 1e3
        out.append({"batch_requests": B, "batch_ms": round(ms, 1), "ms_per_request": round(ms / B, 1)})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mar"), p.add_argument("--ar"), p.add_argument("--tokenizer")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--requests", type=int, default=64, help="requests per cell (at least 2x concurrency)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="time limit per cell")
    p.add_argument("--max-batch-size", type=int, default=32, help="batch size when batching is on")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--decoder", choices=["deployment", "ingress"], default="deployment")
    p.add_argument("--compare-decoder", action="store_true",
                   help="also run MAR cells with the decoder in the other placement (batching on)")
    p.add_argument("--compare-compile", action="store_true",
                   help="also run every mode (batching on) with `compile: true`: compiled AR decode step and MAR forward")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--port", type=int, default=18801, help="Serve HTTP port (loopback)")
    p.add_argument("--out", default=None, help="write the JSON here as well as to stdout")
    a = p.parse_args()
    given = [f"--{k}" for k in ("mar", "ar", "tokenizer") if getattr(a, k)]
    if given and len(given) < 3:
        p.error(f"--mar, --ar and --tokenizer go together; only {', '.join(given)} given "
                "(give none of them for random tiny checkpoints)")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(ROOT))
    import ray
    from ray import serve

    from maskgil.serve import app

    tmp = tempfile.TemporaryDirectory()
    paths = {"mar": a.mar, "ar": a.ar, "tokenizer": a.tokenizer}
    if not any(paths.values()):
        paths = tiny_checkpoints(Path(tmp.name))
    report_scaling = engine_scaling(paths["mar"], cfg_scale=a.cfg_scale)
    print(json.dumps({"engine_scaling_mar": report_scaling}), file=sys.stderr, flush=True)
    ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    url = f"http://127.0.0.1:{a.port}/generate"
    report = {"setup": {"cpus_visible": os.cpu_count(), "load_avg_start": os.getloadavg(), **vars(a), **paths},
              "engine_scaling_mar": report_scaling, "cells": []}

    def deploy(batch: int, decoder: str, compiled: bool):
        serve.run(app({**paths, "max_batch_size": batch, "decoder": decoder, "max_ongoing_requests": 64,
                       "max_queued_requests": 256, "compile": compiled}), name="maskgil", route_prefix="/")

    plan = [("on", a.max_batch_size, a.decoder, False), ("off", 1, a.decoder, False)]
    if a.compare_decoder:
        plan.append(("on", a.max_batch_size, "ingress" if a.decoder == "deployment" else "deployment", False))
    if a.compare_compile:
        plan.append(("on", a.max_batch_size, a.decoder, True))
    try:
        for batching, batch, decoder, compiled in plan:
            deploy(batch, decoder, compiled)
            modes = a.modes if decoder == a.decoder else ["mar"]
            for mode in modes:
                body = {"cfg_scale": a.cfg_scale, "output": "png", **MODES[mode]}
                asyncio.run(run_cell(url, body, 2, 4, 30))  # warm-up
                for c in a.concurrency:
                    cell = asyncio.run(run_cell(url, body, c, max(a.requests, 2 * c), a.max_seconds))
                    cell.update(mode=mode, batching=batching, decoder=decoder, compiled=compiled)
                    report["cells"].append(cell)
                    print(json.dumps(cell), file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    def rps(mode, batching, c, decoder=a.decoder, compiled=False):
        for cell in report["cells"]:
            if (cell["mode"], cell["batching"], cell["concurrency"], cell["decoder"], cell["compiled"]) == \
                    (mode, batching, c, decoder, compiled):
                return cell["requests_per_s"]

    lo, hi = min(a.concurrency), max(a.concurrency)
    summary = {}
    for mode in a.modes:
        for batching in ("on", "off"):
            r1, rN = rps(mode, batching, lo), rps(mode, batching, hi)
            summary[f"{mode}_batching_{batching}_speedup_c{hi}_over_c{lo}"] = round(rN / r1, 2) if r1 and rN else None
    if a.compare_compile:
        for mode in a.modes:
            for c in a.concurrency:
                r0, r1 = rps(mode, "on", c), rps(mode, "on", c, compiled=True)
                summary[f"{mode}_compiled_speedup_c{c}"] = round(r1 / r0, 2) if r0 and r1 else None
    total_failed = sum(cell["failed"] for cell in report["cells"])
    speedup = summary.get(f"mar_batching_on_speedup_c{hi}_over_c{lo}")
    summary["goal_mar_speedup_ge_4x_zero_failures"] = bool(speedup and speedup >= 4 and total_failed == 0)
    summary["failed_requests"] = total_failed
    report["summary"] = summary
    report["setup"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
