"""Does a text-conditional generator paint what its prompt says? Prompt-following on the embedded set.

Samples one image per held-out caption (the embedded val split: captions the model never trained
on, drawn from the same grammar) and per short paraphrase ("a red circle": a phrasing absent from
training), decodes them with the run's tokenizer and lets the embedded-set classifier (trained on
real images) name colour and shape; prints one JSON object with accuracies per CFG scale and saves
PNG grids: the paraphrase samples (one row per class) and the first 32 held-out captions' samples
(their captions in val_captions.txt, row-major).

    python benchmarks/bench_text_to_image.py --mar runs/t2i/maskgil --tokenizer runs/quickstart/tokenizer \
        --classifier runs/quickstart/classifier --out runs/t2i/bench
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from maskgil.checkpoint import load_pretrained  # noqa: E402
from maskgil.classifier import class_accuracy, load_embedded_classifier  # noqa: E402
from maskgil.data.embedded import CLASS_NAMES, EmbeddedSpec, make_dataset  # noqa: E402
from maskgil.images import image_grid, save_png  # noqa: E402
from maskgil.text import TextEncoder  # noqa: E402
from maskgil.tokenizers import load_tokenizer  # noqa: E402
from maskgil.training.samples import decode_tokens, sample_tokens  # noqa: E402


def judge_prompts(model, encoder, tokenizer, judge, prompts: list[str], labels: np.ndarray, *, cfg_scale: float,
                  steps: int, seed: int) -> tuple[dict, np.ndarray]:
    grid = tuple(model.config.grid_size)
    t0 = time.perf_counter()
    tokens, _ = sample_tokens(model, prompts, 1, grid, cfg_scale=cfg_scale, steps=steps, seed=seed,
                              text_encoder=encoder)
    seconds = time.perf_counter() - t0
    images = decode_tokens(tokenizer, tokens, grid)
    scores = class_accuracy(judge, images, labels)
    scores["n"], scores["sample_seconds"] = len(prompts), round(seconds, 1)
    return scores, images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mar", required=True, help="text-conditional generator checkpoint (MaskGIL or causal)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--classifier", required=True, help="embedded-set classifier dir (the quickstart's)")
    p.add_argument("--num-captions", type=int, default=256, help="held-out val captions to sample")
    p.add_argument("--per-class", type=int, default=8, help="samples per short paraphrase prompt")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--out", help="directory for the PNG grids")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    model = load_pretrained(a.mar).eval()
    if model.config.cond != "text":
        raise SystemExit(f"{a.mar} is class-conditional; this benchmark needs a text-conditional model")
    encoder = TextEncoder.for_model(model)
    tokenizer, judge = load_tokenizer(a.tokenizer), load_embedded_classifier(a.classifier)
    spec = EmbeddedSpec(split="val", width=a.image_size, height=a.image_size)
    _, val_labels, val_captions = make_dataset(spec, a.num_captions)
    short = [f"a {name}" for name in CLASS_NAMES]  # "a red circle": absent from the training captions
    short_prompts = [s for s in short for _ in range(a.per_class)]
    short_labels = np.repeat(np.arange(len(CLASS_NAMES)), a.per_class)

    result = {"model": a.mar, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
              "text_encoder": encoder.name, "steps": a.steps, "by_cfg": {}}
    for cfg in a.cfg:
        held_out, val_images = judge_prompts(model, encoder, tokenizer, judge, val_captions, val_labels,
                                             cfg_scale=cfg, steps=a.steps, seed=a.seed)
        para, images = judge_prompts(model, encoder, tokenizer, judge, short_prompts, short_labels, cfg_scale=cfg,
                                     steps=a.steps, seed=a.seed)
        result["by_cfg"][f"{cfg:g}"] = {"val_captions": held_out, "short_prompts": para}
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            for name, imgs, ncol in (("short_prompts", images, a.per_class), ("val_captions", val_images[:32], 8)):
                big = np.kron(image_grid(imgs, ncol=ncol), np.ones((2, 2, 1), np.uint8))
                save_png(big, Path(a.out) / f"{name}_cfg{cfg:g}.png")
            (Path(a.out) / "val_captions.txt").write_text("\n".join(val_captions[:32]) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
