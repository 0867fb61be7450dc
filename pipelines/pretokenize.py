r"""Pre-tokenize an image set into Parquet token shards with Ray Data.

Local (starts Ray in-process):
    python pipelines/pretokenize.py --source data/embedded/train --format imagenet \
        --tokenizer checkpoints/tok --out data/tokens --image-size 64
On a cluster (`ray start --head` or `ray up`), paths must be visible to the workers (or URIs):
    ray job submit --working-dir . -- python pipelines/pretokenize.py --source s3://bucket/imagenet/train \
        --format imagenet --tokenizer /shared/tok --out s3://bucket/tokens/in256 --num-tokenizers 8
Rerunning the same command resumes: finished shards are kept, the rest is done.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from maskgil.cli import HelpFormatter, check_ranges  # noqa: E402
from maskgil.cluster import cluster_address, init_ray  # noqa: E402
from maskgil.data.images import check_crop_range, parse_buckets  # noqa: E402
from maskgil.data.pretokenize import PretokenizeConfig, format_summary, run_pretokenize  # noqa: E402
from maskgil.data.shards import MANIFEST, QUARANTINE  # noqa: E402
from maskgil.data.sources import Columns, plan_shards  # noqa: E402


def buckets_arg(text: str) -> tuple[tuple[int, int], ...]:
    """--buckets converter: parse_buckets' message shown by argparse (a ValueError would be hidden)."""
    try:
        buckets = parse_buckets(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if any(w < 1 or h < 1 for w, h in buckets):
        raise argparse.ArgumentTypeError(f"bucket sides must be >= 1, got {text!r}")
    return buckets


# Numeric flags and the smallest value each takes (None: unset, the default decides).
AT_LEAST = {"image_size": 1, "rows_per_shard": 1, "num_tokenizers": 1, "batch_size": 1, "min_side": 1,
            "max_pixels": 1, "max_new_shards": 1, "num_cpus": 1, "gpus_per_tokenizer": 0}
ABOVE_ZERO = ("cpus_per_tokenizer", "decode_cpus")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--source", required=True, help="image set: local path or URI (s3://, gs://)")
    p.add_argument("--format", required=True, choices=["imagenet", "parquet", "webdataset"], help="layout of --source")
    p.add_argument("--out", required=True, help="output directory (local path or URI)")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--image-size", type=int, default=256,
                   help="square crop side in px (a multiple of the tokenizer's downsample factor)")
    p.add_argument("--augment", choices=["none", "flip", "ten-crop"], default="none",
                   help="rows per image: none (centre crop), flip (+ mirrored), ten-crop")
    p.add_argument("--crop-range", type=float, default=1.1, help="ten-crop: crop from a centre crop this much larger")
    p.add_argument("--buckets", type=buckets_arg, default=None, help="aspect-ratio buckets WxH,WxH,... (caption sets)")
    p.add_argument("--target", choices=["label", "caption"], default=None, help="default: label for imagenet; parquet: label if the column exists, else caption; webdataset: caption")
    p.add_argument("--rows-per-shard", type=int, default=1000, help="input images per output shard (imagenet, parquet)")
    p.add_argument("--num-tokenizers", type=int, default=1, help="tokenizer actor pool size")
    p.add_argument("--gpus-per-tokenizer", type=float, default=None, help="default: 1 if the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-tokenizer", type=float, default=1.0, help="CPUs reserved per tokenizer actor (torch threads on CPU)")
    p.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs reserved per decode task")
    p.add_argument("--batch-size", type=int, default=64, help="images per tokenizer call")
    p.add_argument("--min-side", type=int, default=32, help="quarantine images with a shorter side")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="quarantine images with more pixels")
    p.add_argument("--image-column", default="image", help="parquet: column holding the image (bytes or {bytes, path})")
    p.add_argument("--label-column", default="label", help="parquet: class label column")
    p.add_argument("--caption-column", default="caption", help="parquet: caption column")
    p.add_argument("--max-new-shards", type=int, default=None, help="stop after this many shards (resume later)")
    p.add_argument("--address", default=None, help="Ray address; default: $RAY_ADDRESS (set by ray job submit), else start locally")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a locally started Ray")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI")
    p.add_argument("--experiment", default="pretokenize", help="MLflow experiment name")
    p.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    args = p.parse_args(argv)
    try:  # a usage error now, not a ValueError from the driver after Ray has started
        check_crop_range(args.crop_range)
    except ValueError as e:
        p.error(f"--crop-range: {e}")
    check_ranges(p, args, AT_LEAST, ABOVE_ZERO)
    return args


def check_inputs(cfg: PretokenizeConfig) -> None:
    """What the driver would refuse only after Ray and MLflow have started, checked before: the
    tokenizer loads, the image sizes divide by its downsample factor, the preprocessing settings fit
    together, and the source holds inputs in its format. Raises ValueError (OSError from a parquet
    source's schema read)."""
    from maskgil.tokenizers import load_tokenizer

    try:  # a path that is no tokenizer checkpoint, or one whose weights do not load
        down = int(load_tokenizer(cfg.tokenizer).downsample)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"--tokenizer: {e}") from None
    pre = cfg.preprocess()  # e.g. ten-crop with buckets
    for w, h in pre.buckets or ((cfg.image_size, cfg.image_size),):
        if w % down or h % down:
            flag = "--buckets" if pre.buckets else "--image-size"
            raise ValueError(f"{flag}: image size {w}x{h} is not a multiple of the tokenizer's downsample factor "
                             f"{down} (try {max(down, round(w / down) * down)}x{max(down, round(h / down) * down)})")
    try:
        plan = plan_shards(cfg.source, cfg.format, cfg.rows_per_shard)
    except (OSError, ValueError) as e:
        raise ValueError(f"--source: {e}") from None
    if not plan:
        raise ValueError(f"--source: {cfg.source} holds no images in the {cfg.format} layout")
    cfg.resolved_target()  # parquet: the label or caption column exists


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = PretokenizeConfig(
        source=args.source, format=args.format, out=args.out, tokenizer=args.tokenizer, image_size=args.image_size,
        augment=args.augment, crop_range=args.crop_range, buckets=args.buckets, target=args.target,
        rows_per_shard=args.rows_per_shard, num_tokenizers=args.num_tokenizers, gpus_per_tokenizer=args.gpus_per_tokenizer,
        cpus_per_tokenizer=args.cpus_per_tokenizer, decode_cpus=args.decode_cpus, batch_size=args.batch_size, min_side=args.min_side,
        max_pixels=args.max_pixels, columns=Columns(args.image_column, args.label_column, args.caption_column),
        max_new_shards=args.max_new_shards)
    try:  # a wrong tokenizer, size or source stops here, before Ray and MLflow start
        check_inputs(cfg)
    except (OSError, ValueError, TypeError) as e:
        print(f"pretokenize.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    import ray

    address = cluster_address(args.address)
    init_ray(address, num_cpus=args.num_cpus if address == "local" else None)

    run = None
    status = "FAILED"  # unless the run gets to the end: a raise or a SystemExit leaves it FAILED
    try:
        if not args.no_mlflow:
            import mlflow

            mlflow.set_tracking_uri(args.tracking_uri)
            mlflow.set_experiment(args.experiment)
            run = mlflow.start_run()
            params = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "columns"}
            params.update(dataclasses.asdict(cfg.columns))
            mlflow.log_params({k: str(v) for k, v in params.items()})
        summary = run_pretokenize(cfg)
        print(format_summary(summary))
        if run is not None:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            if summary["tokenizer_device"]:
                mlflow.set_tag("tokenizer_device", summary["tokenizer_device"])
            _log_outputs(mlflow, cfg.out)
        if summary["complete"] and not summary["reconciled"]:
            raise SystemExit("pretokenize: counts do not reconcile (seen != written + quarantined)")
        status = "FINISHED"
        return summary
    finally:
        if run is not None:
            import mlflow

            mlflow.end_run(status=status)
        ray.shutdown()


def _log_outputs(mlflow, out: str) -> None:
    """Manifest and quarantine list as run artifacts (copied locally first, so URIs work too)."""
    from maskgil.data.shards import _Dir

    d = _Dir(out)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (MANIFEST, QUARANTINE):
            if d.exists(name):
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(d.read_text(name))
                mlflow.log_artifact(os.path.join(tmp, name))
        if d.exists(MANIFEST):
            m = json.loads(d.read_text(MANIFEST))
            mlflow.set_tags({"tokenizer": m["tokenizer"]["name"], "tokenizer_sha256": m["tokenizer"]["weights_sha256"]})


if __name__ == "__main__":
    main()
