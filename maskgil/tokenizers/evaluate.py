r"""Reconstruction metrics of a tokenizer: PSNR, SSIM, codebook usage %, rFID. Also a CLI:

    python -m maskgil.tokenizers.evaluate --tokenizer DIR --images embedded:512:val --image-size 64 \
        --classifier runs/classifier      # + class/colour/shape accuracy on the reconstructions
    python -m maskgil.tokenizers.evaluate --tokenizer DIR --images /data/imagenet/val --format imagenet \
        --image-size 256 --limit 50000 --inception-weights pt_inception-2015-12-05-6726825d.pth

Prints one JSON object. PSNR/SSIM use the data range of [-1, 1] images (2.0) via `maskgil.metrics`;
rFID is the Frechet distance between Inception pool3 features of originals and reconstructions
(offline TorchScript network by default, the torch-fidelity weights file when given; the output
names which). Usage = distinct codes used over all evaluated images / codebook size.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Iterator

import numpy as np
import torch

from maskgil.cli import HelpFormatter
from maskgil.metrics import (FeatureStats, InceptionFeatureExtractor, fid_from_stats, frechet_distance_from_features,
                             psnr, ssim)
from maskgil.metrics.generation import FID_SMALL_SAMPLE
from maskgil.tokenizers.base import ImageTokenizer, load_tokenizer, to_model_input


def _batches(images: Any, batch_size: int) -> Iterator[Any]:
    for i in range(0, len(images), batch_size):
        yield images[i : i + batch_size]


def swap_random_codes(codes: torch.Tensor, fraction: float, codebook_size: int, seed: int = 0) -> torch.Tensor:
    """`codes` (any shape, on the CPU) with each entry replaced, with probability `fraction`, by a
    uniformly random code; seeded, so every tokenizer is tested on the same positions."""
    g = torch.Generator().manual_seed(seed)
    swap = torch.rand(codes.shape, generator=g) < fraction
    return torch.where(swap, torch.randint(0, codebook_size, codes.shape, generator=g), codes.cpu())


def evaluate_tokenizer(tokenizer: ImageTokenizer, images: Any, batch_size: int = 32, rfid: bool = True,
                       inception_weights: str | None = None, progress: bool = False, labels: Any = None,
                       classifier: Any = None, wrong_codes: float = 0.2, perceptual: str | None = None) -> dict:
    """Metrics of `tokenizer` on `images` (uint8 (N,H,W,3)/(N,3,H,W) or float (N,3,H,W) in [-1,1]).

    With embedded-set `labels` and an `EmbeddedClassifier`, also how often the classifier still names
    the right class / colour / shape on the reconstructions (vs on the originals): whether the
    tokenizer keeps the classes recognisable; and `wrong_codes_accuracy`, the same on images decoded
    from the codes with a `wrong_codes` fraction swapped for random ones (`swap_random_codes`). A
    generator's tokens are never all right: this tells how well the decoder keeps the object around
    the wrong ones, which reconstructions from clean codes do not show. `perceptual`: the perceptual
    loss the tokenizer trained with (its checkpoint's `extra`), so that an rFID measured with the
    network the tokenizer was trained to match says so.
    """
    from tqdm.auto import tqdm

    n = len(images)
    if n == 0:
        raise ValueError("no images to evaluate")
    psnrs, ssims, used = [], [], torch.zeros(tokenizer.codebook_size, dtype=torch.bool)
    originals, recons, all_codes = [], [], []
    # Features batch by batch: 50,000 images at 256 px would take ~40 GB each as float tensors.
    extractor = InceptionFeatureExtractor(weights_path=inception_weights, batch_size=batch_size) if rfid else None
    f_real, f_rec = [], []
    start = time.time()
    for batch in tqdm(_batches(images, batch_size), total=-(-n // batch_size), disable=not progress, desc="reconstruct"):
        x = to_model_input(batch)
        codes = tokenizer.encode(x)
        rec = tokenizer.decode(codes).cpu()  # clamped to [-1, 1]
        used[codes.reshape(-1).cpu()] = True
        psnrs.append(psnr(x, rec, data_range=2.0))
        ssims.append(ssim(x, rec, data_range=2.0))
        if extractor is not None:
            f_real.append(extractor.features(x))
            f_rec.append(extractor.features(rec))
        if classifier is not None:  # the embedded set's judge: small sets, kept whole
            all_codes.append(codes.cpu())
            originals.append(x)
            recons.append(rec)
    out = {
        "n_images": n,
        "image_size": list(to_model_input(images[:1]).shape[-2:]),
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "codebook_usage_pct": 100.0 * float(used.sum()) / tokenizer.codebook_size,
        "codes_used": int(used.sum()),
        "codebook_size": tokenizer.codebook_size,
        "reconstruct_s": time.time() - start,
    }
    if classifier is not None and labels is not None:
        from maskgil.classifier import class_accuracy

        for name, imgs in (("original", torch.cat(originals)), ("recon", torch.cat(recons))):
            out.update({f"{name}_{k}": v for k, v in class_accuracy(classifier, imgs, labels).items()})
        wrong = swap_random_codes(torch.cat(all_codes), wrong_codes, tokenizer.codebook_size)
        decoded = torch.cat([tokenizer.decode(c).cpu() for c in wrong.split(batch_size)])
        out["wrong_codes_accuracy"] = class_accuracy(classifier, decoded, labels)["accuracy"]
        out["wrong_codes_fraction"] = wrong_codes
    if extractor is not None:
        real, fake = np.concatenate(f_real), np.concatenate(f_rec)
        if n < real.shape[1]:  # fewer images than feature dimensions: exact, without the D x D sqrtm
            out["rfid"] = float(frechet_distance_from_features(real, fake))
        else:  # an N x N SVD would not fit at N = 50,000; the streaming statistics and sqrtm do
            net = extractor.feature_network
            out["rfid"] = float(fid_from_stats(FeatureStats.from_features(fake, net), FeatureStats.from_features(real, net)))
        out["rfid_feature_network"] = extractor.feature_network
        notes = []
        if n < FID_SMALL_SAMPLE:
            notes.append(f"{n} images: FID is biased upwards at small N; compare only at equal N")
        if perceptual and "inception" in perceptual.lower():
            notes.append(f"trained with a perceptual loss on Inception-v3 features ({perceptual}), the network rFID "
                         "measures with: this rFID is not comparable with one of a tokenizer trained with LPIPS")
        if notes:
            out["rfid_note"] = "; ".join(notes)
    return out


def trained_perceptual(tokenizer_dir: str) -> str | None:
    """The perceptual loss a tokenizer checkpoint was trained with, as its trainer recorded it."""
    from maskgil.checkpoint import read_config

    return read_config(tokenizer_dir).get("extra", {}).get("perceptual")


def load_eval_images(spec: str, fmt: str | None = None, image_size: int = 256, limit: int | None = None,
                     with_labels: bool = False):
    """`embedded:N[:split]` -> procedural images; else a directory in `fmt` (imagenet | parquet |
    webdataset), decoded and ADM-centre-cropped to `image_size`. Undecodable inputs are skipped and
    counted on stderr (never silently). `with_labels`: return (images, labels or None)."""
    import sys

    if spec.startswith("embedded"):
        from maskgil.data.embedded import EmbeddedSpec, make_dataset

        parts = spec.split(":")
        n = int(parts[1]) if len(parts) > 1 else (limit or 512)
        split = parts[2] if len(parts) > 2 else "val"
        images, labels, _ = make_dataset(EmbeddedSpec(split=split, width=image_size, height=image_size), n)
        return (images, labels) if with_labels else images
    if fmt is None:
        raise ValueError("--format is required for a directory of images (imagenet | parquet | webdataset)")
    from maskgil.data.images import BadImage, decode_image, resize_crop
    from maskgil.data.sources import plan_shards, read_shard

    out, bad = [], 0
    for shard in plan_shards(spec, fmt):
        for rec in read_shard(shard):
            if limit is not None and len(out) >= limit:
                break
            try:
                if rec.error or rec.data is None:
                    raise BadImage(rec.error or "no data")
                out.append(resize_crop(decode_image(rec.data), image_size, image_size))
            except BadImage:
                bad += 1
    if bad:
        print(f"skipped {bad} undecodable inputs under {spec}", file=sys.stderr)
    if not out:
        raise ValueError(f"no decodable images under {spec}")
    return (np.stack(out), None) if with_labels else np.stack(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory")
    p.add_argument("--images", required=True, help="embedded:N[:split] or a directory")
    p.add_argument("--format", choices=["imagenet", "parquet", "webdataset"], default=None)
    p.add_argument("--image-size", type=int, default=None, help="default: 64 for embedded, else 256")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-rfid", action="store_true", help="skip the Inception pass")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights file (default: offline net)")
    p.add_argument("--classifier", default=None, help="embedded-set classifier dir: class accuracy on reconstructions")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    size = args.image_size or (64 if args.images.startswith("embedded") else 256)
    tok = load_tokenizer(args.tokenizer, map_location=args.device)
    images, labels = load_eval_images(args.images, args.format, size, args.limit, with_labels=True)
    classifier = None
    if args.classifier:
        from maskgil.classifier import load_embedded_classifier

        classifier = load_embedded_classifier(args.classifier)
    result = evaluate_tokenizer(tok, images, args.batch_size, rfid=not args.no_rfid,
                                inception_weights=args.inception_weights, progress=True, labels=labels,
                                classifier=classifier, perceptual=trained_perceptual(args.tokenizer))
    result["tokenizer"] = args.tokenizer
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
