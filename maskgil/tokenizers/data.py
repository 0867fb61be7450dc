"""Image rows for tokenizer training: the per-batch / per-shard functions Ray Data maps over.

Kept free of Ray so they are unit-tested directly; `pipelines/train_tokenizer.py` wires them into
`ray.data` (`range(n).map_batches(embedded_batch)` or `from_items(shards).flat_map(shard_images)`).
"""
from __future__ import annotations

import numpy as np

from maskgil.data.embedded import EmbeddedSpec, make_image


def embedded_batch(batch: dict, image_size: int = 64, seed: int = 0, split: str = "train") -> dict:
    """{"id": int array} -> {"image": uint8 (B, S, S, 3), "label": int64 (B,)}: procedural images by index."""
    spec = EmbeddedSpec(seed=seed, split=split, width=image_size, height=image_size)
    ids = np.asarray(batch["id"]).reshape(-1)
    images = np.empty((len(ids), image_size, image_size, 3), np.uint8)
    labels = np.empty(len(ids), np.int64)
    for i, idx in enumerate(ids):
        img, labels[i], _ = make_image(spec, int(idx))
        images[i] = np.asarray(img)
    return {"image": images, "label": labels}


def shard_to_row(shard) -> dict:
    """An `InputShard` as a plain row (Ray Data rows must be simple values)."""
    return {"shard": shard.to_json()}


def shard_images(row: dict, image_size: int = 256) -> list[dict]:
    """One input shard -> [{"image": uint8 (S, S, 3)}], ADM-centre-cropped. Undecodable inputs are
    dropped here (training only; `pipelines/pretokenize.py` is where inputs are accounted for)."""
    from maskgil.data.images import BadImage, decode_image, resize_crop
    from maskgil.data.sources import InputShard, read_shard

    out = []
    for rec in read_shard(InputShard.from_json(row["shard"])):
        if rec.error or rec.data is None:
            continue
        try:
            out.append({"image": resize_crop(decode_image(rec.data), image_size, image_size)})
        except BadImage:
            continue
    return out
