"""Write the embedded procedural dataset to disk in a real-data layout.

    python pipelines/make_dataset.py imagenet  --out data/embedded --n-train 4096 --n-val 512 --size 64
    python pipelines/make_dataset.py parquet   --out data/embedded_pq --n 4096 --size 256 --num-files 4
    python pipelines/make_dataset.py webdataset --out data/embedded_wds --n 4096 --size 256 --aspect-ratios 0.75 1 1.333
    python pipelines/make_dataset.py imagenet  --out data/embedded_hard --rotate --textures all --max-clutter 3 --size-range 0.4 0.6

The defaults are the quickstart's (unrotated objects at 55-70% of the side on plain grey shades);
--rotate, --textures and --max-clutter make the harder variants. An --out that already holds files
is refused unless --overwrite is given (which removes it first), so a smaller set never leaves files
of an earlier, larger one behind for pretokenize to read.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskgil.cli import HelpFormatter  # noqa: E402
from maskgil.data.embedded import (TEXTURES, EmbeddedSpec, write_imagenet_folder, write_parquet,  # noqa: E402
                                   write_webdataset)

MIN_SIDE = 8  # EmbeddedSpec's smallest image side


def parse_size(text: str) -> int | tuple[int, int]:
    """'64' -> 64, '80x48' -> (80, 48); a usage error (argparse shows the message) otherwise."""
    try:
        sides = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected a side in px or WIDTHxHEIGHT (e.g. 64 or 80x48), got {text!r}")
    if min(sides) < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"image sides must be >= {MIN_SIDE} px, got {text!r}")
    return sides[0] if len(sides) == 1 else sides


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts, ranges and the output directory, before anything is written (argparse-style errors)."""
    if args.format == "imagenet":
        for flag, n in (("--n-train", args.n_train), ("--n-val", args.n_val)):
            if n < 0:
                p.error(f"{flag} must be >= 0, got {n}")
        if args.n_train + args.n_val < 1:
            p.error("--n-train + --n-val must be >= 1 (nothing to write)")
    else:
        if args.n < 1:
            p.error(f"--n must be >= 1, got {args.n}")
        if not 1 <= args.num_files <= args.n:
            p.error(f"--num-files must be in [1, --n={args.n}] (no empty files), got {args.num_files}")
        if args.shard_size < 1:
            p.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if not 1 <= args.quality <= 100:
        p.error(f"--quality must be in [1, 100] (JPEG quality), got {args.quality}")
    if args.aspect_ratios is not None and not all(math.isfinite(r) and r > 0 for r in args.aspect_ratios):
        p.error(f"--aspect-ratios must be finite numbers > 0 (width / height), got {args.aspect_ratios}")
    w, h = (args.size, args.size) if isinstance(args.size, int) else args.size
    try:  # --size-range, --max-clutter, ...: EmbeddedSpec's own checks, before --overwrite removes anything
        EmbeddedSpec(split=args.split, width=w, height=h, **options_of(args))
    except ValueError as e:
        field = str(e).split()[0]  # EmbeddedSpec's messages start with the field they refuse
        flag = {"size_range": "--size-range", "max_clutter": "--max-clutter", "textures": "--textures",
                "caption_style": "--caption-style", "split": "--split"}.get(field)
        p.error(f"{flag}: {e}" if flag else str(e))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            p.error(f"--out {out} is not empty: pass --overwrite to replace it (its files would otherwise "
                    "mix with the new ones), or choose another directory")
        if Path.cwd().resolve().is_relative_to(out.resolve()):
            p.error(f"--out {out} holds the current directory: refusing to remove it with --overwrite")


def options_of(args: argparse.Namespace) -> dict:
    """The EmbeddedSpec fields the flags set; unset flags leave EmbeddedSpec's defaults in charge."""
    return {k: getattr(args, k) for k in ("rotate", "textures", "max_clutter", "size_range", "caption_style")
            if getattr(args, k) is not None}


def main(argv: list[str] | None = None) -> None:
    d = EmbeddedSpec()  # the defaults of the flags that leave them to it
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("format", choices=["imagenet", "parquet", "webdataset"], help="output layout")
    p.add_argument("--out", required=True, help="output directory (must be empty or new, see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="remove a non-empty --out before writing")
    p.add_argument("--size", type=parse_size, default=64, help=f"side in px, or WxH (each >= {MIN_SIDE})")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (the same seed writes the same images)")
    p.add_argument("--n-train", type=int, default=4096, help="imagenet: train images")
    p.add_argument("--n-val", type=int, default=512, help="imagenet: val images")
    p.add_argument("--n", type=int, default=4096, help="parquet/webdataset: images")
    p.add_argument("--split", choices=["train", "val", "test"], default="train",
                   help="parquet/webdataset: split to draw from")
    p.add_argument("--num-files", type=int, default=1, help="parquet: number of files")
    p.add_argument("--shard-size", type=int, default=1000, help="webdataset: images per tar")
    p.add_argument("--image-column", choices=["struct", "binary"], default="struct", help="parquet: image column type")
    p.add_argument("--aspect-ratios", type=float, nargs="*", default=None,
                   help="parquet/webdataset: w/h ratios drawn per image (keeps the pixel area of --size)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (1-100)")
    # Unset flags leave EmbeddedSpec's defaults (the quickstart's) in charge: they live in one place.
    p.add_argument("--rotate", action="store_true", default=None, help="turn each shape by a random angle")
    p.add_argument("--textures", nargs="+", choices=list(TEXTURES) + ["all"],
                   help=f"background textures to draw from (default: {' '.join(d.textures)})")
    p.add_argument("--max-clutter", type=int, help=f"up to this many grey marks under the object (default {d.max_clutter})")
    p.add_argument("--caption-style", choices=["varied", "fixed"],
                   help=f"varied: several phrasings; fixed: always the full description (default {d.caption_style})")
    p.add_argument("--size-range", type=float, nargs=2, metavar=("LO", "HI"),
                   help=f"object extent as a fraction of the short side (default {d.size_range[0]:g} {d.size_range[1]:g})")
    args = p.parse_args(argv)
    if args.textures:
        args.textures = TEXTURES if "all" in args.textures else tuple(args.textures)
    if args.size_range:
        args.size_range = tuple(args.size_range)
    check_args(p, args)
    options = options_of(args)
    if args.overwrite and os.path.isdir(args.out):
        shutil.rmtree(args.out)

    t0 = time.time()
    if args.format == "imagenet":
        write_imagenet_folder(args.out, args.n_train, args.n_val, args.size, args.seed, args.quality, options)
        n = args.n_train + args.n_val
    elif args.format == "parquet":
        write_parquet(args.out, args.n, args.size, args.seed, args.split, args.num_files, args.image_column,
                      args.aspect_ratios, args.quality, options)
        n = args.n
    else:
        write_webdataset(args.out, args.n, args.size, args.seed, args.split, args.shard_size, args.aspect_ratios,
                         args.quality, options)
        n = args.n
    dt = time.time() - t0
    print(f"wrote {n} images ({args.format}) to {args.out} in {dt:.1f}s ({n / max(dt, 1e-9):.0f} images/s)")


if __name__ == "__main__":
    main()
