"""Reconstruction quality of each tiny tokenizer family after a fixed CPU time budget. JSON out.

    python benchmarks/bench_tiny_tokenizers.py                     # 4 families x 6 min, 2 threads
    python benchmarks/bench_tiny_tokenizers.py --minutes 10 --presets llamagen-vq-tiny --out runs/tok_quality
    python benchmarks/bench_tiny_tokenizers.py --presets llamagen-vq-tiny --steps 1000 --precisions fp32 bf16

Each family trains in this process (the recipe of `default_train_config`: pixel L2 + quantizer
terms, no perceptual/GAN term, which cost more than they give in minutes of CPU) on 4,096 embedded
64 px images, then is measured on 256 held-out val images: PSNR, SSIM, codebook usage, rFID
(offline Inception features; biased upwards at N=256, compare only at equal N) and the embedded
classifier's accuracy on the reconstructions next to its accuracy on the originals: the number
behind "the classes stay recognisable". Reconstruction grids are written as PNG next to the JSON.
`--steps` trains a fixed number of steps instead; `--precisions fp32 bf16` trains each family once
per precision (bf16: autocast with the quantizer in fp32) and reports bf16's speed-up per step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAMILIES = ("llamagen-vq-tiny", "vqgan-maskgit-tiny", "vqgan-chameleon-tiny", "lfq-magvit2-tiny")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--minutes", type=float, default=6.0, help="training wall-time budget per family")
    p.add_argument("--steps", type=int, default=0, help="train exactly this many steps (0: the time budget)")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--n-train", type=int, default=4096)
    p.add_argument("--n-eval", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/tiny_tokenizers", help="tokenizers, PNG grids and results.json")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from maskgil.classifier import train_embedded_classifier
    from maskgil.data.embedded import EmbeddedSpec, make_dataset
    from maskgil.tokenizers.evaluate import evaluate_tokenizer
    from maskgil.tokenizers.training import default_train_config, save_recon_grid, train_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, _, _ = make_dataset(EmbeddedSpec(seed=0, split="train"), args.n_train)
    val, val_labels, _ = make_dataset(EmbeddedSpec(seed=0, split="val"), args.n_eval)
    t = time.time()
    judge, _ = train_embedded_classifier(None, image_size=64)
    result = {"minutes_per_family": None if args.steps else args.minutes, "steps": args.steps or None,
              "threads": args.threads, "n_train": args.n_train,
              "n_eval": args.n_eval, "load_average_at_start": os.getloadavg(),
              "judge_train_seconds": round(time.time() - t, 1),
              "families": {}}
    for preset in args.presets:
        rows = result["families"][preset] = {}
        for precision in args.precisions:
            cfg = default_train_config(preset, perceptual="none", perceptual_weight=0.0, disc_weight=0.0,
                                       precision=precision)
            t = time.time()
            tok, history = train_tokenizer(cfg, train, steps=args.steps or 10**9,
                                           time_limit_s=None if args.steps else args.minutes * 60, log_every=100,
                                           progress=False)
            seconds = time.time() - t
            name = preset if len(args.precisions) == 1 else f"{preset}-{precision}"
            tok.save_pretrained(out / name)
            save_recon_grid(tok, val[:8], out / f"{name}_recon.png")
            scores = evaluate_tokenizer(tok, val, batch_size=64, rfid=True, labels=val_labels, classifier=judge)
            steps = history[-1].get("step") if history else 0
            rows[precision] = {"train_seconds": round(seconds, 1), "steps": steps,
                               "ms_per_step": round(1e3 * seconds / max(steps, 1), 1), "batch_size": cfg.batch_size,
                               "codebook_size": tok.codebook_size, "params": sum(p.numel() for p in tok.parameters()),
                               **scores}
            print(json.dumps({name: rows[precision]}), file=sys.stderr, flush=True)
        if {"fp32", "bf16"} <= set(rows):
            rows["bf16_speedup_per_step"] = round(rows["fp32"]["ms_per_step"] / rows["bf16"]["ms_per_step"], 2)
    text = json.dumps(result, indent=2, default=float)
    (out / "results.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
