r"""Ray Tune sweeps of sampling knobs (CFG, steps, schedule, temperature, fusion k) and of design
knobs that need training; one MLflow run per trial; a table, plots and the best config at the end.

    python pipelines/tune.py ray_configs/sweep_sampling_tiny.yaml --out runs/sweeps/sampling-tiny
    ray job submit --working-dir . -- python pipelines/tune.py ray_configs/sweep_sampling_imagenet.yaml \
        --out /data/sweeps/sampling-imagenet-b
    python pipelines/tune.py ray_configs/sweep_sampling_tiny.yaml --set num_images=32 max_concurrent=1

Writes <out>/results.csv, results.md, fid_vs_cfg.png, fid_vs_steps.png, pareto.png, best.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python pipelines/tune.py` from a checkout
from maskgil.cli import HelpFormatter  # noqa: E402
from maskgil.cluster import cluster_address, init_ray  # noqa: E402
from maskgil.evaluation.sweep import load_sweep  # noqa: E402
from maskgil.training.runconfig import CONFIG_ERRORS  # noqa: E402


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("sweep", help="sweep file (ray_configs/sweep_*.yaml)")
    p.add_argument("--out", help="report directory (default runs/sweeps/<name>)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (one run per trial)")
    p.add_argument("--storage-path", help="Ray Tune storage (default <out>/ray)")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a new local cluster)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override top-level sweep keys")
    a = p.parse_args(argv)

    try:  # a bad sweep file stops here, before Ray starts
        sweep = load_sweep(a.sweep, parse_set(a.set))
    except CONFIG_ERRORS as e:
        p.error(str(e))
    out = Path(a.out or Path("runs/sweeps") / sweep["name"])
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(cluster_address(a.ray_address))
    try:
        if sweep["kind"] == "sampling":
            from maskgil.evaluation.sweep import run_sampling_sweep

            summary = run_sampling_sweep(sweep, out, tracking_uri=a.tracking_uri, storage_path=a.storage_path)
        else:
            from maskgil.evaluation.design import run_design_sweep

            summary = run_design_sweep(sweep, out, tracking_uri=a.tracking_uri, storage_path=a.storage_path)
    finally:
        ray.shutdown()
    print(json.dumps({k: v for k, v in summary.items() if k != "best"}, indent=2))
    if summary.get("errors"):  # the finished trials are reported above; a script still sees the failure
        print(f"{len(summary['errors'])} trial(s) failed: see \"errors\" above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
