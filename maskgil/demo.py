"""Image-free sampling demo: draw token grids from a preset with MAR, AR and fusion and time them.

    python -m maskgil.demo --preset tiny --batch 4

Weights are random unless --mar / --ar point at checkpoint directories, so the tokens are
meaningless; the demo shows the samplers running end to end and what they cost.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from maskgil.cli import HelpFormatter
from maskgil.checkpoint import load_pretrained
from maskgil.models import build_model
from maskgil.sampling import sample_ar, sample_fusion, sample_maskgit


def load_pair(preset: str, mar_dir: str | None, ar_dir: str | None):
    mar = load_pretrained(mar_dir) if mar_dir else build_model(f"maskgil-{preset}")
    ar = load_pretrained(ar_dir) if ar_dir else build_model(f"llamagen-{preset}", vocab_size=mar.config.vocab_size,
                                                            num_classes=mar.config.num_classes)
    return mar.eval(), ar.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "b", "l", "xl", "xxl"],
                   help="size suffix of the maskgil-* / llamagen-* presets (default tiny)")
    p.add_argument("--mar", help="MaskGIL checkpoint directory (default: random weights)")
    p.add_argument("--ar", help="causal (LlamaGen-style) checkpoint directory (default: random weights)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="MaskGIT steps")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--ar-share", type=float, default=0.5, help="fraction of tokens the AR model writes in fusion")
    p.add_argument("--fusion-steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the models (needs g++ on CPU); each sampler is timed after a warm-up call")
    args = p.parse_args(argv)

    mar, ar = load_pair(args.preset, args.mar, args.ar)
    grid = mar.config.grid_size
    n = grid[0] * grid[1]
    k = round(args.ar_share * n)
    cond = torch.arange(args.batch) % mar.config.num_classes
    runs = {
        f"mar-{args.steps}": lambda g: sample_maskgit(mar, cond, grid, steps=args.steps, cfg_scale=args.cfg, generator=g,
                                                          compile=args.compile),
        f"ar-{n}": lambda g: sample_ar(ar, cond, grid, cfg_scale=args.cfg, generator=g, compile=args.compile),
        f"fusion-k{k}-m{args.fusion_steps}": lambda g: sample_fusion(ar, mar, cond, grid, ar_tokens=k,
                                                                     mar_steps=args.fusion_steps, cfg_scale=args.cfg,
                                                                     generator=g, compile=args.compile),
    }
    print(f"preset {args.preset}: MAR {sum(p.numel() for p in mar.parameters()) / 1e6:.1f}M params, "
          f"AR {sum(p.numel() for p in ar.parameters()) / 1e6:.1f}M params, grid {grid[0]}x{grid[1]}, "
          f"batch {args.batch}, CFG {args.cfg}" + ("" if args.mar else " (random weights)")
          + (", compiled (timed after a warm-up call)" if args.compile else ""))
    report = {}
    for name, fn in runs.items():
        if args.compile:
            fn(torch.Generator().manual_seed(args.seed))  # pays the compilation
        t = time.perf_counter()
        tokens = fn(torch.Generator().manual_seed(args.seed))
        dt = time.perf_counter() - t
        report[name] = {"seconds": round(dt, 4), "images_per_s": round(args.batch / dt, 2)}
        print(f"{name:>18}: {dt * 1000:8.1f} ms  ({args.batch / dt:7.1f} img/s)  first row: {tokens[0, :12].tolist()} ...")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
