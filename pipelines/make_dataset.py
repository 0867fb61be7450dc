"""Write the embedded procedural dataset to disk in a real-data layout.

    python pipelines/make_dataset.py imagenet  --out data/embedded --n-train 4096 --n-val 512 --size 64
    python pipelines/make_dataset.py parquet   --out data/embedded_pq --n 4096 --size 256 --num-files 4
    python pipelines/make_dataset.py webdataset --out data/embedded_wds --n 4096 --size 256 --aspect-ratios 0.75 1 1.333
    python pipelines/make_dataset.py imagenet  --out data/embedded_hard --rotate --textures all --max-clutter 3 --size-range 0.4 0.6

The defaults are the quickstart's (unrotated objects at 55-70% of the side on plain grey shades);
--rotate, --textures and --max-clutter make the harder variants.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskgil.data.embedded import TEXTURES, write_imagenet_folder, write_parquet, write_webdataset  # noqa: E402


def parse_size(text: str) -> int | tuple[int, int]:
    if "x" in text:
        w, h = text.lower().split("x")
        return int(w), int(h)
    return int(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=["imagenet", "parquet", "webdataset"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", type=parse_size, default=64, help="side in px, or WxH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=4096, help="imagenet: train images")
    p.add_argument("--n-val", type=int, default=512, help="imagenet: val images")
    p.add_argument("--n", type=int, default=4096, help="parquet/webdataset: images")
    p.add_argument("--split", default="train", help="parquet/webdataset: split to draw from")
    p.add_argument("--num-files", type=int, default=1, help="parquet: number of files")
    p.add_argument("--shard-size", type=int, default=1000, help="webdataset: images per tar")
    p.add_argument("--image-column", choices=["struct", "binary"], default="struct", help="parquet: image column type")
    p.add_argument("--aspect-ratios", type=float, nargs="*", default=None,
                   help="parquet/webdataset: w/h ratios drawn per image (keeps the pixel area of --size)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    # Unset flags leave EmbeddedSpec's defaults (the quickstart's) in charge: they live in one place.
    p.add_argument("--rotate", action="store_true", default=None, help="turn each shape by a random angle")
    p.add_argument("--textures", nargs="+", choices=list(TEXTURES) + ["all"], help="background textures to draw from")
    p.add_argument("--max-clutter", type=int, help="up to this many grey marks under the object")
    p.add_argument("--caption-style", choices=["varied", "fixed"],
                   help="varied (default): several phrasings; fixed: always the full description")
    p.add_argument("--size-range", type=float, nargs=2, metavar=("LO", "HI"),
                   help="object extent as a fraction of the short side")
    args = p.parse_args(argv)
    if args.textures:
        args.textures = TEXTURES if "all" in args.textures else tuple(args.textures)
    if args.size_range:
        args.size_range = tuple(args.size_range)
    options = {k: getattr(args, k) for k in ("rotate", "textures", "max_clutter", "size_range", "caption_style")
               if getattr(args, k) is not None}

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
