"""Throughput of the pretokenize pipeline next to its stages' standalone rates, in one run. JSON out.

    python benchmarks/bench_pretokenize.py                       # 256 px, llamagen-vq (random weights)
    python benchmarks/bench_pretokenize.py --tokenizer-preset llamagen-vq-tiny --image-size 64 --n 512

Stages measured alone, in this one process (same images; the tokenizer with --threads torch
threads, as each pipeline tokenizer worker has):
  decode+crop  read file -> decode_image -> ADM centre crop
  tokenizer    tok.encode on pre-cropped uint8 batches
Pipeline: `run_pretokenize` on a local Ray with the same CPUs; images/s end to end (including Ray
start-up of the actor pool) and marginal: (n - one shard) / (time for n - time for a one-shard set),
which removes the fixed start-up cost (null when the full set was not slower than the one-shard set:
too few images to tell).
On CPU, Ray Data fuses decode and tokenize into one actor, so the reference for one worker is the
serial rate 1 / (1/decode + 1/tokenize); with GPUs the stages overlap and the reference is the
slowest stage. Both references are one process's rates, so the `_one_process` ratios compare W
tokenizer workers with one (ideal scaling: W); the `_per_worker_` ratios divide by W (ideal: 1).
Random tokenizer weights: the throughput of a VQ encoder does not depend on them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-preset", default="llamagen-vq")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--source-size", type=int, default=320, help="side of the embedded JPEGs (cropped to --image-size)")
    p.add_argument("--n", type=int, default=24, help="images")
    p.add_argument("--rows-per-shard", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="tokenizer pool sizes to run")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per tokenizer worker")
    p.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs reserved per decode task")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from maskgil.data.embedded import write_imagenet_folder
    from maskgil.data.images import DecodeLimits, Preprocess, decode_image
    from maskgil.data.pretokenize import PretokenizeConfig, run_pretokenize
    from maskgil.tokenizers import build_tokenizer

    result = {"tokenizer": args.tokenizer_preset, "weights": "random init (throughput does not depend on weights)",
              "image_size": args.image_size, "n_images": args.n, "num_cpus": args.num_cpus, "threads": args.threads,
              "device": "cpu", "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        write_imagenet_folder(tmp / "data", n_train=args.n, n_val=0, size=args.source_size, seed=0)
        result["make_dataset_images_per_s"] = args.n / (time.perf_counter() - t)
        torch.manual_seed(0)
        tok = build_tokenizer(args.tokenizer_preset)
        tok.save_pretrained(tmp / "tok", extra={"name": args.tokenizer_preset})
        files = sorted((tmp / "data" / "train").glob("*/*.JPEG"))

        # Stage 1 alone: decode + crop.
        pre, limits = Preprocess(args.image_size), DecodeLimits()
        t = time.perf_counter()
        crops = [pre(decode_image(f.read_bytes(), limits))[0] for f in files]
        result["decode_crop_images_per_s"] = len(files) / (time.perf_counter() - t)

        # Stage 2 alone: tokenizer on ready crops (warm-up batch excluded; at most 1024 images).
        batch = np.stack(crops[:1024])
        tok.encode(batch[: args.batch_size])
        t = time.perf_counter()
        for lo in range(0, len(batch), args.batch_size):
            tok.encode(batch[lo:lo + args.batch_size])
        result["tokenizer_images_per_s"] = len(batch) / (time.perf_counter() - t)
        del tok

        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="warning",
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        # A one-shard set measures the fixed cost (actor start, tokenizer load, Ray Data start-up).
        write_imagenet_folder(tmp / "small", n_train=args.rows_per_shard, n_val=0, size=args.source_size, seed=1)
        runs = []
        try:
            for w in args.workers:
                seconds = {}
                for name in ("small", "data"):
                    cfg = PretokenizeConfig(source=str(tmp / name / "train"), format="imagenet", out=str(tmp / f"tok-{name}-{w}"),
                                            tokenizer=str(tmp / "tok"), image_size=args.image_size,
                                            rows_per_shard=args.rows_per_shard, num_tokenizers=w, batch_size=args.batch_size,
                                            decode_cpus=args.decode_cpus,
                                            # share what decoding leaves; each actor still runs --threads torch threads
                                            cpus_per_tokenizer=min(float(args.threads), (args.num_cpus - args.decode_cpus) / w))
                    with contextlib.redirect_stdout(sys.stderr):  # its plan lines: stdout is JSON only
                        s = run_pretokenize(cfg, progress=False)
                    assert s["reconciled"]
                    seconds[name] = s["seconds"]
                extra_s = seconds["data"] - seconds["small"]
                marginal = (args.n - args.rows_per_shard) / extra_s if extra_s > 0 else None
                runs.append({"tokenizer_workers": w, "end_to_end_images_per_s": args.n / seconds["data"],
                             "seconds": seconds["data"], "one_shard_seconds": seconds["small"],
                             "marginal_images_per_s": marginal})
        finally:
            ray.shutdown()

    dec, tk = result["decode_crop_images_per_s"], result["tokenizer_images_per_s"]
    result["stage_rates_measured_in"] = "one process (tokenizer: --threads torch threads)"
    result["slowest_stage_images_per_s"] = min(dec, tk)
    result["serial_reference_images_per_s"] = 1 / (1 / dec + 1 / tk)
    for r in runs:
        m, w = r["marginal_images_per_s"], r["tokenizer_workers"]
        for ref in ("slowest_stage", "serial_reference"):
            rate = result[f"{ref}_images_per_s"]
            r[f"marginal_vs_{ref}_one_process"] = m / rate if m is not None else None
            r[f"marginal_per_worker_vs_{ref}_one_process"] = m / (w * rate) if m is not None else None
    result["pipeline"] = runs
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
