"""Sampler and forward-pass performance for one preset, all figures from the same run (JSON out).

    python benchmarks/bench_sampling.py --preset b          # maskgil-b vs llamagen-b (issue goal figures)
    python benchmarks/bench_sampling.py --preset tiny       # quick

Reports
- images/s and latency per image for MAR-8, AR (KV cache, all tokens) and fusion (k = N/2, m = 4),
  at batch 1 and 16, CFG on;
- achieved FLOP/s of one full bidirectional forward at batch 16 vs the matmul peak measured here
  (fp32 on CPU, bf16 on GPU); goal >= 60 % on CPU for maskgil-b;
- AR decode time per token step vs the time to read every weight once (one reduction over a flat
  copy of the weights; its GB/s is reported too); goal <= 2x. Eager, and
  with the decode step under torch.compile (`--compile-modes`: inductor's default mode, and on a
  GPU also "reduce-overhead", i.e. CUDA graphs); the three samplers are timed both ways too
  (`compile=`: the AR decode step and the MAR forward).
Every figure is the best of --repeat timed windows after a warm-up (the weight read: of at least 5).
Only JSON goes to stdout; notices go to stderr.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from maskgil.models import build_model  # noqa: E402
from maskgil.sampling import sample_ar, sample_fusion, sample_maskgit  # noqa: E402
from maskgil.sampling.compiled import compiled_method  # noqa: E402


def timeit(fn, repeat: int, sync) -> float:
    """Best-of-`repeat` seconds for fn() after one warm-up call."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def peak_n_default(device) -> int:
    """Matmul size for the peak: 8192 on CUDA (as bench_train.py), 2048 on CPU."""
    return 8192 if device.type == "cuda" else 2048


def matmul_peak(device, dtype, sync, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 8 if device.type == "cpu" else 50

    def run():
        for _ in range(reps):
            torch.mm(a, b)

    return 2 * n ** 3 * reps / timeit(run, 3, sync)


def forward_flops(model, batch: int, rows: int) -> float:
    """Matmul FLOPs of one forward: 2 * tokens * (linear weights) + attention (QK^T and AV)."""
    c = model.config
    n_img = c.grid_size[0] * c.grid_size[1]
    L = n_img + c.prefix_len
    per_layer = sum(p.numel() for n, p in model.layers[0].named_parameters() if p.dim() == 2)
    linear = 2 * batch * L * per_layer * c.n_layers
    attention = 2 * 2 * batch * L * L * c.dim * c.n_layers
    head = 2 * batch * rows * c.dim * c.vocab_size
    return linear + attention + head


def weight_read_seconds(model, sync, repeat: int = 5) -> tuple[float, int]:
    """Best-of-`repeat` seconds of one reduction over a flat, contiguous copy of every parameter (in
    the model's dtype), and the bytes it reads: the time to stream every weight through memory once,
    as one kernel rather than one launch per parameter. (A copy small enough for the caches reads
    from them, as the decode step's weights do.)"""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    seconds = timeit(flat.sum, repeat, sync)
    return seconds, flat.numel() * flat.element_size()


@torch.no_grad()
def decode_step_seconds(ar, grid, step, sync, repeat: int = 1, steps_timed: int = 64) -> float:
    """Seconds of one AR decode step (batch 1 with CFG = 2 rows), after 3 warm-up steps: the best of
    `repeat` windows, each the mean over `steps_timed` steps (every window replays the same
    positions; the cache has a fixed shape, so each step does the same work)."""
    N = grid[0] * grid[1]
    steps_timed = min(steps_timed, N - 4)
    device = next(ar.parameters()).device
    seq_pos = torch.arange(N, device=device) + ar.config.prefix_len
    cond = torch.zeros(2, dtype=torch.long, device=device)
    ar.setup_kv_cache(2, grid)
    try:
        tok = ar.prefill(cond, drop_cond=torch.tensor([False, True], device=device)).argmax(-1)[:, None]
        for j in range(3):
            step(tok, seq_pos[j:j + 1])
        sync()
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            for j in range(3, 3 + steps_timed):
                step(tok, seq_pos[j:j + 1])
            sync()
            best = min(best, (time.perf_counter() - t) / steps_timed)
        return best
    finally:
        ar.clear_kv_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="b", help="size suffix (tiny, b, l, ...): maskgil-<size> vs llamagen-<size>")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=1, help="timed repetitions per figure (best is reported; >= 1)")
    ap.add_argument("--peak-n", type=int, default=None,
                    help="matmul size for the peak measurement (default: 8192 on CUDA, 2048 on CPU)")
    ap.add_argument("--compile-modes", default=None,
                    help="comma list of torch.compile modes for the samplers ('default', 'reduce-overhead'); "
                         "'' for eager only. Default: 'default' on CPU, 'default,reduce-overhead' on CUDA")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.peak_n is not None and args.peak_n < 1:
        ap.error("--peak-n must be >= 1")

    device = torch.device(args.device)
    peak_n = args.peak_n or peak_n_default(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    mar = build_model(f"maskgil-{args.preset}").to(device, dtype).eval()
    ar = build_model(f"llamagen-{args.preset}").to(device, dtype).eval()
    grid = mar.config.grid_size
    N = grid[0] * grid[1]
    k = N // 2
    modes = args.compile_modes
    if modes is None:
        modes = "default,reduce-overhead" if device.type == "cuda" else "default"
    modes = [m for m in modes.split(",") if m]
    if modes and device.type == "cpu":
        from maskgil.training import cpu_compile_available

        if not cpu_compile_available():
            print("no C++ compiler: compiled sampling is not measured", file=sys.stderr)
            modes = []
    compiled = {m: (True if m == "default" else m) for m in modes}  # name -> sample_ar's `compile`
    out = {"preset": args.preset, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": torch.__version__, "repeat": args.repeat,
           "grid": list(grid), "cfg_scale": args.cfg, "sampling": {}}

    # ---- sampler throughput
    for B in [int(b) for b in args.batches.split(",")]:
        cond = torch.arange(B, device=device) % mar.config.num_classes
        g = torch.Generator(device=device)
        samplers = {  # name -> sampler taking `compile`
            "mar_8": lambda c: sample_maskgit(mar, cond, grid, steps=8, cfg_scale=args.cfg, compile=c,
                                              generator=g.manual_seed(0)),
            f"ar_{N}": lambda c: sample_ar(ar, cond, grid, cfg_scale=args.cfg, compile=c, generator=g.manual_seed(0)),
            f"fusion_k{k}_m4": lambda c: sample_fusion(ar, mar, cond, grid, ar_tokens=k, mar_steps=4, cfg_scale=args.cfg,
                                                       compile=c, generator=g.manual_seed(0)),
        }
        runs = {}
        for name, sampler in samplers.items():
            runs[name] = functools.partial(sampler, False)
            runs.update({f"{name}_compiled_{m}": functools.partial(sampler, c) for m, c in compiled.items()})
        for name, fn in runs.items():
            s = timeit(fn, args.repeat, sync)  # the warm-up call pays any compilation
            out["sampling"][f"{name}_batch{B}"] = {"seconds": round(s, 4), "images_per_s": round(B / s, 3),
                                                   "latency_per_image_s": round(s / B, 4)}
    b16 = max(int(b) for b in args.batches.split(","))
    sp = out["sampling"]
    out["ratios"] = {
        "mar8_vs_ar_speedup": round(sp[f"ar_{N}_batch{b16}"]["seconds"] / sp[f"mar_8_batch{b16}"]["seconds"], 2),
        "fusion_vs_ar_speedup": round(sp[f"ar_{N}_batch{b16}"]["seconds"] / sp[f"fusion_k{k}_m4_batch{b16}"]["seconds"], 2),
    }
    for m in compiled:
        for B in [int(b) for b in args.batches.split(",")]:
            for name in ("mar_8", f"ar_{N}", f"fusion_k{k}_m4"):
                out["ratios"][f"{name}_compiled_{m}_vs_eager_speedup_batch{B}"] = round(
                    sp[f"{name}_batch{B}"]["seconds"] / sp[f"{name}_compiled_{m}_batch{B}"]["seconds"], 2)

    # ---- FLOP/s of one full bidirectional forward at batch 16 vs measured matmul peak
    Bf = 16
    toks = torch.randint(0, mar.config.vocab_size, (Bf, N), device=device)
    cond = torch.arange(Bf, device=device) % mar.config.num_classes
    with torch.no_grad():
        fwd = timeit(lambda: mar(toks, cond, grid), max(2, args.repeat), sync)
    flops = forward_flops(mar, Bf, N)
    peak = matmul_peak(device, dtype, sync, peak_n)
    out["forward"] = {"batch": Bf, "seconds": round(fwd, 4), "gflop": round(flops / 1e9, 1),
                      "achieved_gflops": round(flops / fwd / 1e9, 1), "matmul_peak_gflops": round(peak / 1e9, 1),
                      "fraction_of_peak": round(flops / fwd / peak, 3), "goal": ">= 0.60 on CPU",
                      "peak_source": f"measured {out['dtype']} matmul {peak_n}x{peak_n}x{peak_n} in this run (best of 3)"}

    # ---- AR decode step vs reading every weight once (batch 1 with CFG = 2 rows)
    read_repeat = max(5, args.repeat)
    read, read_bytes = weight_read_seconds(ar, sync, read_repeat)
    out["ar_decode"] = {"weight_read_seconds": round(read, 6), "goal": "<= 2.0",
                        "weights_mb": round(read_bytes / 2**20, 1),
                        "weight_read_gb_per_s": round(read_bytes / read / 1e9, 1),
                        "weight_read_method": f"one sum over a flat contiguous {out['dtype']} copy of all weights, "
                                              f"best of {read_repeat}",
                        "decode_step_method": f"mean of {min(64, N - 4)} steps, best of {args.repeat} windows"}
    for name, c in {"eager": False, **{f"compiled_{m}": c for m, c in compiled.items()}}.items():
        step = decode_step_seconds(ar, grid, compiled_method(ar, "decode_step", c), sync, args.repeat)
        out["ar_decode"][name] = {"seconds_per_token_step": round(step, 5), "ratio": round(step / read, 2)}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
