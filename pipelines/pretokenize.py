"""Pre-tokenize an image set into Parquet token shards with Ray Data.

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

from maskgil.checkpoint import read_config  # noqa: E402
from maskgil.cluster import cluster_address, init_ray  # noqa: E402
from maskgil.data.images import check_crop_range, parse_buckets  # noqa: E402
from maskgil.data.pretokenize import PretokenizeConfig, format_summary, run_pretokenize  # noqa: E402
from maskgil.data.shards import MANIFEST, QUARANTINE  # noqa: E402
from maskgil.data.sources import Columns  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="image set: local path or URI (s3://, gs://)")
    p.add_argument("--format", required=True, choices=["imagenet", "parquet", "webdataset"])
    p.add_argument("--out", required=True, help="output directory (local path or URI)")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--augment", choices=["none", "flip", "ten-crop"], default="none")
    p.add_argument("--crop-range", type=float, default=1.1, help="ten-crop: crop from a centre crop this much larger")
    p.add_argument("--buckets", type=parse_buckets, default=None, help="aspect-ratio buckets WxH,WxH,... (caption sets)")
    p.add_argument("--target", choices=["label", "caption"], default=None, help="default: label for imagenet; parquet: label if the column exists, else caption; webdataset: caption")
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--num-tokenizers", type=int, default=1, help="tokenizer actor pool size")
    p.add_argument("--gpus-per-tokenizer", type=float, default=None, help="default: 1 if the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-tokenizer", type=float, default=1.0, help="CPUs reserved per tokenizer actor (torch threads on CPU)")
    p.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs reserved per decode task")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--min-side", type=int, default=32, help="quarantine images with a shorter side")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="quarantine images with more pixels")
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--max-new-shards", type=int, default=None, help="stop after this many shards (resume later)")
    p.add_argument("--address", default=None, help="Ray address; default: $RAY_ADDRESS (set by ray job submit), else start locally")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a locally started Ray")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="pretokenize")
    p.add_argument("--no-mlflow", action="store_true")
    args = p.parse_args(argv)
    try:  # a usage error now, not a ValueError from the driver after Ray has started
        check_crop_range(args.crop_range)
    except ValueError as e:
        p.error(f"--crop-range: {e}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:  # the driver reads the tokenizer first anyway: a wrong path stops here, before Ray starts
        read_config(args.tokenizer)
    except (OSError, ValueError) as e:
        print(f"pretokenize.py: error: --tokenizer: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    cfg = PretokenizeConfig(
        source=args.source, format=args.format, out=args.out, tokenizer=args.tokenizer, image_size=args.image_size,
        augment=args.augment, crop_range=args.crop_range, buckets=args.buckets, target=args.target,
        rows_per_shard=args.rows_per_shard, num_tokenizers=args.num_tokenizers, gpus_per_tokenizer=args.gpus_per_tokenizer,
        cpus_per_tokenizer=args.cpus_per_tokenizer, decode_cpus=args.decode_cpus, batch_size=args.batch_size, min_side=args.min_side,
        max_pixels=args.max_pixels, columns=Columns(args.image_column, args.label_column, args.caption_column),
        max_new_shards=args.max_new_shards)

    import ray

    address = cluster_address(args.address)
    init_ray(address, num_cpus=args.num_cpus if address == "local" else None)

    run = None
    if not args.no_mlflow:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
        mlflow.set_experiment(args.experiment)
        run = mlflow.start_run()
        params = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "columns"}
        params.update(dataclasses.asdict(cfg.columns))
        mlflow.log_params({k: str(v) for k, v in params.items()})
    try:
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
        return summary
    finally:
        if run is not None:
            import mlflow

            mlflow.end_run()
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
