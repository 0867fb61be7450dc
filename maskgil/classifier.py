"""A small CNN that names the class of an embedded-dataset image: the judge of generated samples.

FID says how close two distributions are; it does not say whether a sample of class 7 looks like
class 7. On the embedded set (shape x colour classes, `maskgil.data.embedded`) this classifier,
trained on real images in about a minute on 2 CPU cores, answers that, and splits the answer into
"right colour" and "right shape" so a failure can be read.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskgil.checkpoint import load_pretrained, register_model, save_pretrained
from maskgil.data.embedded import CLASS_NAMES, COLOUR_NAMES, NUM_CLASSES, SHAPES, EmbeddedSpec, make_dataset
from maskgil.metrics.images import to_minus_one_one


@dataclasses.dataclass
class ClassifierConfig:
    image_size: int = 64  # inputs of any size are resized to this
    num_classes: int = NUM_CLASSES
    widths: tuple[int, ...] = (16, 32, 48, 64)  # one conv block per width, each halves the resolution


@register_model("embedded-classifier")
class EmbeddedClassifier(nn.Module):
    """conv-BN-ReLU-maxpool blocks, then mean and max pooling (colour lives in the mean, shape
    evidence in the max) and a linear head."""

    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        blocks, in_ch = [], 3
        for w in config.widths:
            blocks += [nn.Conv2d(in_ch, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            in_ch = w
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(2 * in_ch, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float in [-1, 1] -> logits (N, num_classes)."""
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        h = self.features(x)  # (N, C, size / 16, size / 16)
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))


def shape_and_colour(labels) -> tuple[np.ndarray, np.ndarray]:
    """Embedded labels -> (shape index, colour index): label = shape * len(COLOUR_NAMES) + colour."""
    labels = np.asarray(labels)
    return labels // len(COLOUR_NAMES), labels % len(COLOUR_NAMES)


@torch.no_grad()
def classify(model: EmbeddedClassifier, images, batch_size: int = 256) -> np.ndarray:
    """Predicted labels (N,) for images: uint8 or [-1, 1], NCHW or NHWC, any size."""
    model.eval()
    device = next(model.parameters()).device
    x = to_minus_one_one(images)
    preds = [model(x[i:i + batch_size].to(device)).argmax(dim=1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(preds).numpy() if preds else np.zeros(0, np.int64)


def class_accuracy(model: EmbeddedClassifier, images, labels) -> dict:
    """{'accuracy', 'colour_accuracy', 'shape_accuracy'} of the classifier's calls against `labels`."""
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= model.config.num_classes):
        raise ValueError(f"labels must be in 0..{model.config.num_classes - 1}, got {labels.min()}..{labels.max()}")
    pred = classify(model, images)
    ps, pc = shape_and_colour(pred)
    ts, tc = shape_and_colour(labels)
    return {
        "accuracy": float((pred == labels).mean()),
        "colour_accuracy": float((pc == tc).mean()),
        "shape_accuracy": float((ps == ts).mean()),
    }


def train_embedded_classifier(out_dir: str | os.PathLike | None, image_size: int = 64, n_train: int = 2048,
                              n_val: int = 512, steps: int = 200, batch_size: int = 64, lr: float = 3e-3,
                              seed: int = 0, data_seed: int = 0, log_every: int = 0):
    """Train on real embedded `train` images, measure on `val`; save a checkpoint dir unless out_dir is None.

    Returns (model, val_accuracy). The colour and shape accuracies are in config.json's "extra".
    Augmentation: horizontal flips and mild pixel noise, so decoded (slightly blurred, noisy)
    samples are not out of distribution for it.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y, _ = make_dataset(EmbeddedSpec(seed=data_seed, split="train", width=image_size, height=image_size), n_train)
    val_x, val_y, _ = make_dataset(EmbeddedSpec(seed=data_seed, split="val", width=image_size, height=image_size), n_val)
    x = to_minus_one_one(train_x)  # (n_train, 3, S, S)
    y = torch.from_numpy(train_y)

    model = EmbeddedClassifier(ClassifierConfig(image_size=image_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    start = time.time()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        xb = x[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        xb = (xb + 0.05 * torch.randn(xb.shape, generator=gen)).clamp(-1, 1)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.1f}s)", flush=True)
    model.eval()
    scores = class_accuracy(model, val_x, val_y)
    if out_dir is not None:
        save_pretrained(model, out_dir, extra={
            "val_" + k: v for k, v in scores.items()
        } | {"n_train": n_train, "n_val": n_val, "steps": steps, "seed": seed, "data_seed": data_seed,
             "train_seconds": round(time.time() - start, 1), "class_names": list(CLASS_NAMES),
             "shapes": list(SHAPES), "colours": list(COLOUR_NAMES)})
    return model, scores["accuracy"]


def load_embedded_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> EmbeddedClassifier:
    return load_pretrained(path, map_location=device, expected_type=EmbeddedClassifier)
