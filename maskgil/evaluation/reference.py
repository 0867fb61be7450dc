"""Reference sets for FID / precision / recall, built once and cached as `.npz`.

A reference is one of:
- a folder of real images (ImageNet layout `val/<wnid>/*.JPEG`, the embedded val split, any tree
  of .jpg/.png): decoded with the pretokenizer's safe decoder, ADM centre-cropped to the size of
  the generated images, run through the feature network; cached under a key made of the file list
  (paths, sizes, mtimes), the crop size, the network and the subset;
- an ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`, `mu`/`sigma` + `arr_0`): its images
  are re-extracted with our network (same network as the samples, and precision/recall become
  possible), or its precomputed TF-graph mu/sigma are used as they are (`adm_stats="precomputed"`);
- a sample batch (`arr_0` only, e.g. what `evaluate.py --npz` writes): its images are extracted;
- a cached reference `.npz` written by this module (`feature_network` inside).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from maskgil.metrics import InceptionFeatureExtractor, Reference, load_adm_reference
from maskgil.metrics.fid import comparable_networks
from maskgil.metrics.generation import extract_features

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"reference folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def pick_subset(n_files: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a class-unbiased subset (seeded, sorted) of at most `limit` files; all when None."""
    if limit is None or limit >= n_files:
        return np.arange(n_files)
    return np.sort(np.random.default_rng(seed).choice(n_files, size=limit, replace=False))


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _iter_folder_batches(files: list[Path], size: tuple[int, int], batch_size: int, skipped: list):
    from maskgil.data.images import BadImage, decode_image, resize_crop

    batch = []
    for f in files:
        try:
            batch.append(resize_crop(decode_image(f.read_bytes()), size[1], size[0]))  # (H, W, 3) uint8
        except BadImage as e:
            skipped.append((str(f), e.reason))
            continue
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def folder_reference(folder: str | os.PathLike, image_hw: tuple[int, int], extractor: InceptionFeatureExtractor,
                     cache_dir: str | os.PathLike, limit: int | None = None, batch_size: int = 32,
                     progress: bool = True) -> tuple[Reference, Path]:
    """Reference of a folder of real images at `image_hw` (H, W); returns (reference, cache path)."""
    folder = Path(folder).resolve()
    files = list_images(folder)
    stats = [(str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    chosen = pick_subset(len(files), limit)
    key = _cache_key({"folder": str(folder), "files": stats, "hw": list(image_hw), "limit": limit,
                      "network": extractor.feature_network})
    cache = Path(cache_dir) / f"reference-{key}.npz"
    if cache.is_file():
        return Reference.load(cache), cache
    skipped: list = []
    picked = [files[i] for i in chosen]
    feats, _ = extract_features(extractor, _iter_folder_batches(picked, image_hw, batch_size, skipped),
                                total=len(picked), progress=progress)
    if skipped:
        print(f"reference: skipped {len(skipped)} unreadable image(s), e.g. {skipped[:3]}", flush=True)
    name = (f"folder:{folder} ({len(feats)} images{'' if limit is None else f' of {len(files)}'}, "
            f"ADM centre crop {image_hw[0]}x{image_hw[1]})")
    ref = Reference.from_features(feats, extractor.feature_network, name)
    ref.save(cache)
    return ref, cache


def npz_reference(path: str | os.PathLike, extractor: InceptionFeatureExtractor, cache_dir: str | os.PathLike,
                  adm_stats: str = "reextract", limit: int | None = None, batch_size: int = 32,
                  progress: bool = True) -> tuple[Reference, Path]:
    """Reference from an .npz: our cache, an ADM reference batch, or a plain `arr_0` sample batch
    (a seeded subset of `limit` images when given; statistics already computed cannot be limited)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"reference file {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
    if adm_stats not in ("reextract", "precomputed"):
        raise ValueError(f"adm_stats must be 'reextract' or 'precomputed', got {adm_stats!r}")
    precomputed = "feature_network" in keys or ({"mu", "sigma"} <= keys and adm_stats == "precomputed")
    if precomputed and limit is not None:
        raise ValueError(f"{path} holds feature statistics that are already computed: a reference limit applies to "
                         "images (a folder, or an ADM batch's arr_0 with adm_stats='reextract')")
    if "feature_network" in keys:
        return Reference.load(path), path
    if {"mu", "sigma"} <= keys and adm_stats == "precomputed":
        return Reference.from_adm(load_adm_reference(path, load_images=False)), path
    if "arr_0" not in keys:
        raise ValueError(f"{path}: neither a reference cache (feature_network), an ADM batch (mu, sigma, arr_0) "
                         f"nor a sample batch (arr_0); has {sorted(keys)}")
    if limit is not None and limit < 2:
        raise ValueError(f"a reference needs at least 2 images, got limit {limit}")
    st = path.stat()
    key = _cache_key({"npz": str(path), "size": st.st_size, "mtime": st.st_mtime_ns, "network": extractor.feature_network,
                      "limit": limit})
    cache = Path(cache_dir) / f"reference-{key}.npz"
    if cache.is_file():
        return Reference.load(cache), cache
    with np.load(path, mmap_mode="r", allow_pickle=False) as z:
        images = z["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{path}: arr_0 should be uint8 NHWC RGB, got {images.dtype} {images.shape}")
        chosen = pick_subset(len(images), limit)  # like a folder's: a seeded, class-unbiased subset
        batches = (np.asarray(images[chosen[i:i + batch_size]]) for i in range(0, len(chosen), batch_size))
        feats, _ = extract_features(extractor, batches, total=len(chosen), progress=progress)
    kind = "adm" if "mu" in keys else "npz"
    ref = Reference.from_features(feats, extractor.feature_network, f"{kind}:{path.name} ({len(feats)} images)")
    ref.save(cache)
    return ref, cache


def load_reference(spec: str | os.PathLike, image_hw: tuple[int, int], extractor: InceptionFeatureExtractor,
                   cache_dir: str | os.PathLike, limit: int | None = None, adm_stats: str = "reextract",
                   progress: bool = True) -> tuple[Reference, Path]:
    """A folder or an .npz (see the module doc); returns (reference, path of its cached .npz).
    Refuses, before any sampling, a reference whose features come from a network the samples' cannot
    be compared with (a cache made with other Inception weights, ADM's TF statistics with another net)."""
    p = Path(spec)
    if p.is_dir():
        ref, path = folder_reference(p, image_hw, extractor, cache_dir, limit=limit, progress=progress)
    elif p.suffix == ".npz":
        ref, path = npz_reference(p, extractor, cache_dir, adm_stats=adm_stats, limit=limit, progress=progress)
    else:
        raise FileNotFoundError(f"reference {spec}: not a folder of images or an .npz file")
    if not comparable_networks(extractor.feature_network, ref.feature_network):
        raise ValueError(f"reference {spec} holds features of {ref.feature_network!r}, but this evaluation extracts "
                         f"them with {extractor.feature_network!r}: give the same --inception-weights as the "
                         "reference was made with, or a folder / ADM batch to extract anew")
    return ref, path
