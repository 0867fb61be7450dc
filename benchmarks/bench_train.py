"""Training throughput of a generator preset: tokens/s and achieved FLOP/s against the matmul peak
measured in the same process (fp32 on CPU; bf16 on GPU with --precision bf16).

    python benchmarks/bench_train.py                          # maskgil-b, batch 16, 16x16 tokens, CPU fp32
    python benchmarks/bench_train.py --device cuda --precision bf16 --batch 64
    python benchmarks/bench_train.py --device cuda --precision bf16 --batch 256 --compile --spec-peak-tflops 989
    python benchmarks/bench_train.py --device cuda --precision bf16 --batch 256 --compile --strategy fsdp

FLOPs per step are counted by torch.utils.flop_counter (matmuls and attention, forward + backward;
on CPU with formulas added here for the CPU flash-attention ops, which torch does not count),
and cross-checked against the closed form 6 * (body matmul params) * tokens + 6 * (head params) *
(hidden tokens: the masked objective's head sees only those) + 12 * layers * dim * L^2 * B (the JSON
gives counted / closed form; a warning goes to stderr when they differ by more than 2 %). Every
timed step replays step 0's masks, so the FLOPs counted on it hold for each. `--compile` is the
training path's `train.compile: true` (each block and the loss through torch.compile).
`--strategy fsdp` wraps the model with FSDP2 on a one-process group, as `train.strategy: fsdp` does:
with bf16 that is MixedPrecisionPolicy (bf16 weights, activations and residual stream, fp32 master
weights) instead of autocast over fp32 weights (bf16 matmuls, fp32 residual stream).
`fraction_of_peak` ("MFU") is achieved FLOP/s over the matmul peak measured in the same run
(`peak_source`; --peak-n: 8192 on CUDA, 2048 on CPU), not over the vendor's datasheet figure; give
--spec-peak-tflops for `mfu_vs_spec` against that.
Goal: >= 50% of the measured fp32 peak on CPU, >= 45% MFU on a GPU. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

try:  # torch's own sdpa formulas (as for the CUDA flash / efficient / cuDNN kernels)
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402
except ImportError:  # pragma: no cover - a torch without these helpers: the same formulas
    def sdpa_flop_count(q, k, v):  # Q K^T and P V
        (b, h, s_q, d_q), s_k, d_v = q, k[2], v[3]
        return 2 * b * h * s_q * s_k * (d_q + d_v)

    def sdpa_backward_flop_count(grad_out, q, k, v):  # Q K^T again, dP, dV, dQ, dK
        (b, h, s_q, d_q), s_k, d_v = q, k[2], v[3]
        return 2 * b * h * s_q * s_k * (3 * d_q + 2 * d_v)

from maskgil.models import build_model  # noqa: E402
from maskgil.training import TrainConfig, build_optimizer, compile_blocks, train_step  # noqa: E402
from maskgil.training.distributed import init_single_process_group, wrap_model  # noqa: E402
from maskgil.training.loop import step_seed  # noqa: E402
from maskgil.training.objectives import random_token_mask  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n: int, repeats: int) -> float:
    """Best FLOP/s of an n x n x n matmul: the machine's practical peak for this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def profile_steps(step, device, n: int = 3) -> dict:
    """Where a step's time goes: kernel time over wall time (the device-busy fraction; the rest is
    launch overhead and host work) and the kernels that take longest. Prints the full table to stderr."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(n):
            step(i)
        sync(device)
    wall = time.perf_counter() - t
    averages = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(averages.table(sort_by=key, row_limit=30), file=sys.stderr)
    # Kernel rows (device type CUDA) hold each kernel's time once; op rows (CPU) hold what they launched.
    busy = sum(e.self_device_time_total for e in averages if e.device_type.name == "CUDA") / 1e6 if cuda else None
    rows = sorted(((e.key, getattr(e, key)) for e in averages if e.device_type.name == "CPU"), key=lambda r: -r[1])
    return {"steps": n, "wall_s_per_step": wall / n,
            "device_busy_fraction": busy / wall if busy is not None else None,
            "top": [{"op": k[:90], "ms_per_step": v / 1e3 / n} for k, v in rows[:12]]}


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's FlopCounterMode has no formula for the CPU flash-attention kernels (attention would count 0).
_aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    getattr(_aten, name): fn
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flop),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flop))
    if hasattr(_aten, name)
}


def count_step_flops(model, cfg: TrainConfig, batch: dict, grid, device) -> float:
    """FLOPs (matmuls and attention, forward + backward) of one eager, unwrapped training step on
    step 0's masks: what every timed step computes, however the timed model is wrapped or compiled."""
    eager = dataclasses.replace(cfg, strategy="none", compile=False)
    opt = build_optimizer(model, eager)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        train_step(model, opt, [batch], eager, 0, grid, device=device)
    return counter.get_total_flops()


def scored_tokens(cfg: TrainConfig, batch: int, n_tokens: int, step: int = 0) -> int:
    """Tokens the masked objective scores at `step` (the first draw of that step's generator)."""
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, 0, 0))
    return int(random_token_mask(batch, n_tokens, cfg.mask_schedule, gen).sum())


def closed_form_flops(model, batch: int, grid, scored: int) -> float:
    c = model.config
    mats = {n: p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embedding" not in n}
    head = sum(mats.pop(n) for n in list(mats) if n.startswith(("output.", "sub_heads.")))  # vocabulary head(s)
    L = c.prefix_len + grid[0] * grid[1]  # sequence length (prefix + image tokens)
    head_rows = batch * grid[0] * grid[1] if c.causal else scored
    return 6 * sum(mats.values()) * batch * L + 6 * head * head_rows + 12 * c.n_layers * c.dim * L * L * batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="maskgil-b")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--grid", type=int, nargs=2, default=[16, 16])
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=2, help="timed steps (after --warmup; >= 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 0)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--peak-n", type=int, default=None,
                   help="matmul size for the peak measurement (default: 8192 on CUDA, 2048 on CPU)")
    p.add_argument("--spec-peak-tflops", type=float, default=None,
                   help="the device's datasheet peak for this dtype (dense TFLOP/s): adds `mfu_vs_spec`")
    p.add_argument("--profile", action="store_true",
                   help="profile 3 more steps: device-busy fraction and the top kernels (table on stderr)")
    p.add_argument("--no-cudnn-attention", action="store_true", help="GPU: let SDPA pick flash/efficient kernels")
    p.add_argument("--compile", action="store_true",
                   help="time torch.compile'd steps (FLOPs are counted on one eager step of a copy)")
    p.add_argument("--strategy", choices=["none", "fsdp"], default="none",
                   help="fsdp: FSDP2 on a one-process group (bf16: MixedPrecisionPolicy instead of autocast)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.peak_n is not None and args.peak_n < 1:
        p.error("--peak-n must be >= 1")
    if args.spec_peak_tflops is not None and args.spec_peak_tflops <= 0:
        p.error("--spec-peak-tflops must be > 0")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak_n = args.peak_n or (8192 if device.type == "cuda" else 2048)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        if args.no_cudnn_attention:
            torch.backends.cuda.enable_cudnn_sdp(False)
    grid = tuple(args.grid)
    N = grid[0] * grid[1]
    cfg = TrainConfig(preset=args.preset, global_batch=args.batch, precision=args.precision, strategy=args.strategy,
                      compile=args.compile)
    build = lambda: build_model(args.preset, vocab_size=args.vocab, num_classes=args.classes, grid_size=grid)  # noqa: E731
    batch = {"tokens": torch.randint(0, args.vocab, (args.batch, N), device=device),
             "label": torch.randint(0, args.classes, (args.batch,), device=device)}
    counted = count_step_flops(build().to(device), cfg, batch, grid, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # The timed model, set up the way ray_trainer does: compile blocks, then wrap, then the optimizer.
    torch.manual_seed(0)
    model = build()
    if args.compile:
        compile_blocks(model)
    if args.strategy == "fsdp":
        init_single_process_group(device)
    model = wrap_model(model, args.strategy, device, args.precision)
    opt = build_optimizer(model, cfg)

    peak_before = matmul_peak(device, dtype, peak_n, repeats=5)
    step = lambda: train_step(model, opt, [batch], cfg, 0, grid, device=device)  # noqa: E731 (step 0's masks)
    t = time.perf_counter()
    for _ in range(args.warmup + (2 if args.compile else 0)):  # compiled: the first calls compile
        step()
    sync(device)
    warmup_s = time.perf_counter() - t
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    peak_after = matmul_peak(device, dtype, peak_n, repeats=5)
    step_s = min(times)
    scored = scored_tokens(cfg, args.batch, N)
    peak = max(peak_before, peak_after)
    achieved = counted / step_s
    closed = closed_form_flops(model, args.batch, grid, scored)
    ratio = counted / closed
    if abs(ratio - 1) > 0.02:
        print(f"warning: counted FLOPs are {ratio:.4f}x the closed form ({counted:.4g} vs {closed:.4g}); "
              "fraction_of_peak uses the counted figure", file=sys.stderr)
    cuda = device.type == "cuda"
    out = {
        "preset": args.preset, "params": sum(p.numel() for p in model.parameters()), "batch": args.batch,
        "grid": list(grid), "vocab": args.vocab, "device": str(device), "precision": args.precision,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "compile": args.compile, "strategy": args.strategy,
        "cudnn_attention": (not args.no_cudnn_attention) if cuda else None, "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "step_seconds": times, "best_step_s": step_s,
        "tokens_per_s": args.batch * N / step_s,
        "warmup_s": warmup_s, "scored_tokens": scored,
        "flops_per_step_counted": counted,
        "flops_per_step_closed_form": closed,
        "flops_counted_over_closed_form": ratio,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "achieved_flops": achieved, "matmul_peak_flops": peak, "peak_before_after": [peak_before, peak_after],
        "fraction_of_peak": achieved / peak,
        "peak_source": f"measured {args.precision} matmul {peak_n}x{peak_n}x{peak_n} in this run "
                       "(best of 5, before and after the timed steps; the larger)",
        "spec_peak_flops": args.spec_peak_tflops * 1e12 if args.spec_peak_tflops else None,
        "mfu_vs_spec": achieved / (args.spec_peak_tflops * 1e12) if args.spec_peak_tflops else None,
        "goal": 0.45 if cuda else 0.50,
        "load_average": os.getloadavg(),
        "note": "timings are only as good as the machine's load; the peak is measured in the same run",
    }
    if args.profile:
        out["profile"] = profile_steps(lambda i: step(), device)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
