"""Tokenizer throughput and LFQ entropy-loss memory. Prints one JSON object.

    python benchmarks/bench_tokenizers.py                       # 256 px, batch 16, CPU
    python benchmarks/bench_tokenizers.py --device cuda --iters 10
    python benchmarks/bench_tokenizers.py --skip-throughput --entropy-tokens 1024

Throughput: encode and decode images/s of `llamagen-vq` (random weights: speed does not depend on
them) and the `lfq-magvit2` encoder, at --image-size with --batch-size, in the channels-last layout
the library keeps tokenizers in and in the default one (`channels_last_*_speedup`).
Memory: forward + backward of the LFQ entropy loss (2^18 codes) over --entropy-tokens latent
vectors, dense (the N x 2^18 tensor) vs chunked (+ activation checkpointing). Each variant runs
in a fresh subprocess; CPU memory is the growth of peak RSS (VmHWM) over the pre-loss baseline,
GPU memory is torch.cuda.max_memory_allocated growth.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def entropy_memory_child(tokens: int, bits: int, chunk: int | None, device: str) -> dict:
    """Run in a subprocess: memory and time of one forward + backward of the entropy loss."""
    import torch

    from maskgil.tokenizers.lfq import lfq_entropy_terms

    torch.manual_seed(0)
    warm = (torch.randn(64, 12, device=device) * 0.05).requires_grad_(True)  # load kernels/thread pools first
    sum(lfq_entropy_terms(warm, 0.01, chunk=chunk and 1024)).backward()
    z = (torch.randn(tokens, bits, device=device) * 0.05).requires_grad_(True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = _peak_rss_bytes()
    t0 = time.time()
    per_sample, codebook = lfq_entropy_terms(z, 0.01, chunk=chunk)
    (per_sample - codebook).backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes()
    return {"tokens": tokens, "bits": bits, "chunk": chunk, "peak_extra_bytes": peak - base,
            "peak_extra_mib": (peak - base) / 2**20, "seconds": time.time() - t0,
            "loss": (per_sample - codebook).item(), "memory": "cuda max_memory_allocated" if device.startswith("cuda") else "peak RSS"}


def entropy_memory(tokens: int, bits: int, chunk: int | None, device: str) -> dict:
    code = ("import json,sys; sys.path.insert(0, %r); from bench_tokenizers import entropy_memory_child as f; "
            "print(json.dumps(f(%d, %d, %r, %r)))" % (os.path.dirname(os.path.abspath(__file__)), tokens, bits, chunk, device))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"tokens": tokens, "bits": bits, "chunk": chunk, "error": out.stderr.strip().splitlines()[-1:] or ["killed"],
                "returncode": out.returncode}
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput(name: str, image_size: int, batch: int, iters: int, warmup: int, device: str, decode: bool) -> dict:
    """Encode (and decode) images/s in the library's channels-last layout and in the default
    contiguous one, timed alternately on the same weights and inputs: their ratio is the layout's gain."""
    import torch

    from maskgil.tokenizers import build_tokenizer

    layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    torch.manual_seed(0)
    tok = build_tokenizer(name).to(device).eval()
    x = (torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1)

    def timed(fn):
        for _ in range(warmup):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(iters):
            out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.time() - t0) / iters, out

    res = {"tokenizer": name, "params": tok.num_params(), "image_size": image_size, "batch": batch}
    codes = tok.encode(x)
    res["tokens"] = list(codes.shape[1:])
    times = {layout: {"encode": [], "decode": []} for layout in layouts}
    for _ in range(2):  # alternate, so a machine getting slower or faster does not favour one layout
        for layout, memory_format in layouts.items():
            tok.to(memory_format=memory_format)
            times[layout]["encode"].append(timed(lambda: tok.encode(x))[0])
            if decode:
                times[layout]["decode"].append(timed(lambda: tok.decode(codes))[0])
    for layout, t in times.items():
        for op, secs in t.items():
            if secs:
                res[f"{layout}_{op}_images_per_s"] = batch / min(secs)
    for op in ("encode", "decode") if decode else ("encode",):
        res[f"channels_last_{op}_speedup"] = min(times["contiguous"][op]) / min(times["channels_last"][op])
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--entropy-tokens", type=int, nargs="*", default=[256, 1024],
                   help="latent vectors in the entropy loss (256 = one 256 px image at 16x downsampling)")
    p.add_argument("--entropy-chunk", type=int, default=8192)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--presets", nargs="+", default=["llamagen-vq", "lfq-magvit2"],
                   help="tokenizers to time (e.g. llamagen-vq-tiny --image-size 64: the quickstart's)")
    p.add_argument("--skip-dense", action="store_true", help="dense needs ~3 x tokens x 2^18 x 4 bytes")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"device": args.device, "torch_threads": torch.get_num_threads(), "throughput": [], "entropy_memory": []}
    if not args.skip_throughput:
        for name in args.presets:  # the LFQ preset's decoder is not timed (its encoder is the comparison's)
            result["throughput"].append(throughput(name, args.image_size, args.batch_size, args.iters, args.warmup,
                                                   args.device, decode=name != "lfq-magvit2"))
    for n in args.entropy_tokens:
        result["entropy_memory"].append(entropy_memory(n, 18, args.entropy_chunk, args.device))
        if not args.skip_dense:
            result["entropy_memory"].append(entropy_memory(n, 18, None, args.device))
        result["entropy_memory"][-1]["dense_one_tensor_bytes"] = n * 2**18 * 4
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
