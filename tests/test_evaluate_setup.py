"""Shared tiny setup for the evaluation and sweep tests (no tests here).

Random-weight maskgil-tiny / llamagen-tiny / llamagen-vq-tiny checkpoints (8x8 tokens, 64x64
images, 16 classes) and 32 embedded val images as the reference folder; built once per pytest
session under its base temp dir, so the reference features are cached once too."""
from __future__ import annotations

from pathlib import Path

import torch

REFERENCE_IMAGES = 32
TRAINING_RUN_ID = "0123456789abcdef0123456789abcdef"


def tiny_setup(base: Path) -> dict:
    """Paths of the tiny checkpoints, reference folder and cache dir under `base` (built once)."""
    from maskgil.checkpoint import save_pretrained
    from maskgil.data.embedded import write_imagenet_folder
    from maskgil.models import build_model
    from maskgil.tokenizers import build_tokenizer

    root = base / "maskgil-eval-setup"
    paths = {"tokenizer": root / "tok", "mar": root / "mar", "ar": root / "ar",
             "reference": root / "data" / "val", "cache": root / "cache"}
    if not (root / "done").exists():
        g = torch.random.get_rng_state()
        torch.manual_seed(0)
        save_pretrained(build_model("maskgil-tiny"), paths["mar"], extra={"mlflow_run_id": TRAINING_RUN_ID})
        save_pretrained(build_model("llamagen-tiny"), paths["ar"])
        build_tokenizer("llamagen-vq-tiny").save_pretrained(paths["tokenizer"])
        torch.random.set_rng_state(g)
        write_imagenet_folder(root / "data", n_train=0, n_val=REFERENCE_IMAGES, size=64)
        (root / "done").write_text("ok")
    return {k: str(v) for k, v in paths.items()}
