"""Metric throughput: Inception features (images/s at 256 px), precision/recall / FID cost, and SSIM.

Prints one JSON object (and writes it with --out). CPU by default; --device cuda on a GPU.
Example: python benchmarks/bench_metrics.py --threads 2 --batches 3 --pr-n 10000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from maskgil.metrics import InceptionFeatureExtractor, frechet_distance, precision_recall  # noqa: E402


def bench_inception(device: str, image_size: int, batch_size: int, batches: int) -> dict:
    extractor = InceptionFeatureExtractor(device=device, batch_size=batch_size)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    extractor.features(images)  # warm-up: TorchScript profiles and optimises on the first calls
    extractor.features(images)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        extractor.features(images)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"image_size": image_size, "batch_size": batch_size, "images": batches * batch_size,
            "seconds": round(seconds, 3), "images_per_s": round(batches * batch_size / seconds, 2),
            "feature_network": extractor.feature_network}


def bench_precision_recall(n: int, dim: int, device: str, block_size: int) -> dict:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(n, dim)).astype(np.float32)
    gen = (rng.normal(size=(n, dim)) * 1.1 + 0.05).astype(np.float32)
    start = time.perf_counter()
    pr = precision_recall(real, gen, k=3, block_size=block_size, device=device)
    return {"n_real": n, "n_gen": n, "dim": dim, "block_size": block_size,
            "seconds": round(time.perf_counter() - start, 3), **pr}


def bench_fid(dim: int) -> dict:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = a @ a.T / dim, b @ b.T / dim
    start = time.perf_counter()
    frechet_distance(np.zeros(dim), s1, np.zeros(dim), s2)
    return {"dim": dim, "sqrtm_seconds": round(time.perf_counter() - start, 3)}


def bench_ssim(n: int, size: int, batch_size: int = 128) -> dict:
    """The library's SSIM (the Gaussian window applied as rows then columns) against the same formula
    with the 11x11 window applied at once, on the same noisy image pairs: time and largest difference."""
    import torch.nn.functional as F

    from maskgil.metrics.image_quality import SSIM_K1, SSIM_K2, gaussian_taps, ssim

    def ssim_2d_window(a, b):  # [-1, 1] images, data range 2
        a, b = a.double() + 1, b.double() + 1
        c = a.shape[1]
        g = gaussian_taps()
        win = torch.outer(g, g).expand(c, 1, *g.shape, *g.shape)

        def blur(x):
            return F.conv2d(x, win, groups=c)

        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        c1, c2 = (SSIM_K1 * 2) ** 2, (SSIM_K2 * 2) ** 2
        m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        return m.flatten(1).mean(1)

    g = torch.Generator().manual_seed(0)
    a = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    seconds, values = {}, {}
    for _ in range(2):  # alternate: a machine that speeds up or slows down favours neither
        for name, fn in (("separable", lambda x, y: ssim(x, y, data_range=2.0)), ("window_2d", ssim_2d_window)):
            start = time.perf_counter()
            values[name] = torch.cat([fn(x, y) for x, y in zip(a.split(batch_size), b.split(batch_size))])
            seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - start)
    return {"images": n, "image_size": size, "separable_seconds": round(seconds["separable"], 3),
            "window_2d_seconds": round(seconds["window_2d"], 3),
            "speedup": round(seconds["window_2d"] / seconds["separable"], 2),
            "max_abs_difference": float((values["separable"] - values["window_2d"]).abs().max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=3, help="timed batches after two warm-up batches")
    p.add_argument("--pr-n", type=int, default=10_000, help="features per set for precision/recall (0: skip)")
    p.add_argument("--pr-dim", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--fid-dim", type=int, default=0, help="also time one D x D sqrtm (2048 = real FID); 0: skip")
    p.add_argument("--ssim-n", type=int, default=512, help="image pairs for SSIM (the quickstart's 512 val images; 0: skip)")
    p.add_argument("--ssim-size", type=int, default=64)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": os.getloadavg(), "torch": torch.__version__, "device": args.device,
                    "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "inception": bench_inception(args.device, args.image_size, args.batch_size, args.batches),
    }
    if args.pr_n:
        result["precision_recall"] = bench_precision_recall(args.pr_n, args.pr_dim, args.device, args.block_size)
    if args.fid_dim:
        result["fid_sqrtm"] = bench_fid(args.fid_dim)
    if args.ssim_n:
        result["ssim"] = bench_ssim(args.ssim_n, args.ssim_size)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
