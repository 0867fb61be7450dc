"""How fast does a generator learn class-conditional *shape*, with the tokenizer taken out of the loop?

The quickstart's MaskGIL gets colour right but shape only ~35% of the time. This benchmark asks
whether that is the tokens' fault or the generator's: it trains a preset with the quickstart's
recipe (batch 64, lr 1e-3, warmup + cosine, the real `train_step`) on *crisp synthetic token grids*
where a class is (shape, colour): one of four 5x5 cell templates (disc, square, triangle, cross),
filled with one of four colour codes, at a random offset on an 8x8 grid of one of four background
codes. A sample's shape is read back exactly (best template IoU over all offsets), so no image
classifier is involved. Prints one JSON object: shape/colour accuracy of samples at CFG 2 at each
evaluation step, for every preset given (e.g. MaskGIL vs the causal LlamaGen on the same data),
with the number of empty samples (no colour-coded cell: read as the first template, a disc) and
the chance level of shape accuracy (`chance_shape_accuracy`: one in the number of templates).

    python benchmarks/bench_shape_learning.py            # MaskGIL vs causal LlamaGen, 600 steps each
    python benchmarks/bench_shape_learning.py --presets maskgil-tiny --steps 1200 --eval-at 600,1200
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

from maskgil.models import build_model  # noqa: E402
from maskgil.training import TrainConfig, build_optimizer, train_step  # noqa: E402
from maskgil.training.samples import sample_tokens  # noqa: E402

TEMPLATES = {  # 5x5 cells; the four are distinct under every shift that keeps them on the grid
    "disc": ["01110", "11111", "11111", "11111", "01110"],
    "square": ["11110", "11110", "11110", "11110", "00000"],
    "triangle": ["00100", "01110", "01110", "11111", "11111"],
    "cross": ["00100", "00100", "11111", "00100", "00100"],
}
MASKS = [np.array([[c == "1" for c in row] for row in rows]) for rows in TEMPLATES.values()]
GRID, BACKGROUNDS, COLOUR_BASE = 8, 4, 10  # codes 0-3: backgrounds; 10-13: colours
CHANCE_SHAPE_ACCURACY = 1 / len(TEMPLATES)  # 0.25: a uniform guess among the four templates


def make_token_grids(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 64) token grids and (n,) labels = shape * 4 + colour, every class equally often."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 16
    grids = np.empty((n, GRID, GRID), np.int64)
    for i, label in enumerate(labels):
        grids[i] = rng.integers(BACKGROUNDS)
        oy, ox = rng.integers(GRID - 4, size=2)
        grids[i, oy:oy + 5, ox:ox + 5][MASKS[label // 4]] = COLOUR_BASE + label % 4
    return grids.reshape(n, -1), labels


def _placements() -> tuple[np.ndarray, np.ndarray]:
    """Every template at every on-grid offset, once: masks (P, 64) bool and their shape ids (P,)."""
    masks, shapes = [], []
    for s, m in enumerate(MASKS):
        for oy in range(GRID - 4):
            for ox in range(GRID - 4):
                placed = np.zeros((GRID, GRID), bool)
                placed[oy:oy + 5, ox:ox + 5] = m
                masks.append(placed.ravel())
                shapes.append(s)
    return np.stack(masks), np.array(shapes)


PLACED, PLACED_SHAPE = _placements()


def object_cells(tokens: np.ndarray) -> np.ndarray:
    """(B, 64) bool: the cells of each grid that hold a colour code."""
    tokens = tokens.reshape(-1, GRID * GRID)
    return (tokens >= COLOUR_BASE) & (tokens < COLOUR_BASE + 4)


def count_empty(tokens: np.ndarray) -> int:
    """Grids with no colour-coded cell at all (read_class reads them as a disc of colour 0)."""
    return int((~object_cells(tokens).any(1)).sum())


def read_class(tokens: np.ndarray) -> np.ndarray:
    """Shape * 4 + colour of each (B, 64) grid: the template (any offset) with the best IoU against
    the cells holding a colour code (first in template order on ties), and the most frequent colour."""
    tokens = tokens.reshape(-1, GRID * GRID)
    obj = object_cells(tokens)  # (B, 64)
    inter = obj.astype(np.int64) @ PLACED.T.astype(np.int64)  # (B, P)
    union = obj.sum(1, keepdims=True) + PLACED.sum(1) - inter
    shape = PLACED_SHAPE[(inter / np.maximum(union, 1)).argmax(1)]
    colour = np.array([np.bincount(t[o] - COLOUR_BASE, minlength=4).argmax() if o.any() else 0
                       for t, o in zip(tokens, obj)])
    return shape * 4 + colour


def run(preset: str, overrides: dict, train_overrides: dict, steps: int, eval_at: list[int], per_class: int,
        data: tuple, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build_model(preset, vocab_size=512, num_classes=16, grid_size=(GRID, GRID), **overrides)
    recipe = dict(max_steps=steps, global_batch=64, lr=1e-3, lr_schedule="cosine", warmup_steps=40, min_lr_ratio=0.1)
    cfg = TrainConfig.from_dict({"preset": preset, "seed": seed, **recipe, **train_overrides})
    opt = build_optimizer(model, cfg)
    grids, labels = data
    g = torch.Generator().manual_seed(seed)
    curve, train_s = [], 0.0
    for step in range(steps):
        idx = torch.randint(0, len(grids), (cfg.global_batch,), generator=g).numpy()
        t0 = time.perf_counter()
        m = train_step(model, opt, [{"tokens": grids[idx], "label": labels[idx]}], cfg, step, (GRID, GRID))
        train_s += time.perf_counter() - t0
        if step + 1 in eval_at:
            model.eval()
            tokens, want = sample_tokens(model, list(range(16)), per_class, (GRID, GRID), cfg_scale=2.0, seed=1)
            got, want = read_class(tokens.numpy()), np.asarray(want)
            curve.append({"step": step + 1, "train_s": round(train_s, 1), "loss": round(m["loss"], 3),
                          "samples": len(got), "empty_samples": count_empty(tokens.numpy()),
                          "accuracy": float((got == want).mean()),
                          "shape_accuracy": float((got // 4 == want // 4).mean()),
                          "colour_accuracy": float((got % 4 == want % 4).mean())})
            print(json.dumps({"preset": preset, **curve[-1]}), file=sys.stderr, flush=True)
    return {"preset": preset, "overrides": overrides, "train_overrides": train_overrides,
            "params_M": round(model.num_params() / 1e6, 2), "curve": curve}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["maskgil-tiny", "llamagen-tiny"])
    p.add_argument("--overrides", default='{"dim": 128, "multiple_of": 32}',
                   help="JSON model overrides for every preset (default: the quickstart's half width)")
    p.add_argument("--train-overrides", default="{}",
                   help='JSON TrainConfig fields, e.g. {"label_smoothing": 0.0, "mask_schedule": "arccos"}')
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-at", default="300,600")
    p.add_argument("--per-class", type=int, default=8, help="samples per class at each evaluation (16 classes)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = make_token_grids(8192, a.seed)
    sanity = float((read_class(data[0][:256]) == data[1][:256]).mean())  # the reader on real grids
    eval_at = [int(s) for s in a.eval_at.split(",")]
    results = [run(preset, json.loads(a.overrides), json.loads(a.train_overrides), a.steps, eval_at, a.per_class,
                   data, a.seed) for preset in a.presets]
    out = {"benchmark": "shape_learning", "reader_accuracy_on_data": sanity,
           "chance_shape_accuracy": CHANCE_SHAPE_ACCURACY, "threads": a.threads,
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "results": results}
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
