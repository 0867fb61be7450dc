r"""Train a MaskGIL / AR generator on token shards with Ray Train; every run is an MLflow run.

    python pipelines/train.py --config ray_configs/train_maskgil_tiny.yaml --shards runs/quickstart/shards
    ray job submit --working-dir . -- python pipelines/train.py --config ray_configs/train_maskgil_b.yaml \
        --set data.shards=/data/imagenet_tokens scaling.num_workers=8

Rerunning the same command (same run.name and run.storage_path) resumes from the last checkpoint.
Shards pretokenized with --buckets (aspect-ratio buckets) train on all their grids, one grid per
micro-batch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskgil.cli import HelpFormatter  # noqa: E402
from maskgil.training.ray_trainer import check_run, run_training  # noqa: E402
from maskgil.training.runconfig import CONFIG_ERRORS, load_run_config, parse_overrides  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", help="run config YAML (ray_configs/train_*.yaml)")
    p.add_argument("--shards", help="token shard directory (sets data.shards)")
    p.add_argument("--output", help="final plain checkpoint directory (sets run.output)")
    p.add_argument("--name", help="run name: Ray Train run dir and MLflow run name (sets run.name)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint dir, for sample grids (sets run.tokenizer)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="override config values, e.g. train.max_steps=100 scaling.num_workers=2")
    args = p.parse_args(argv)
    try:  # a bad run file or override, or shards that do not fit the model, stop here, before Ray starts
        overrides = parse_overrides(args.set)
        for key, section, value in (("shards", "data", args.shards), ("output", "run", args.output),
                                    ("name", "run", args.name), ("tokenizer", "run", args.tokenizer),
                                    ("tracking_uri", "run", args.tracking_uri)):
            if value is not None:
                overrides.setdefault(section, {})[key] = value
        cfg = load_run_config(args.config, overrides)
        checked = check_run(cfg)  # shards' manifest, codebook, target and labels against the model
    except CONFIG_ERRORS as e:
        p.error(str(e))
    out = run_training(cfg, checked=checked)
    print(json.dumps({k: v for k, v in out.items() if k != "metrics"}, indent=2))
    print(f"final checkpoint: {out['checkpoint']} (step {out['step']}); MLflow run {out['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
