"""Ray Tune sweeps: sweep files, the trial functions, and the end-of-sweep report.

A sweep file (`ray_configs/sweep_*.yaml`) says what to vary. Sampling sweeps (`kind: sampling`)
vary sampler settings of fixed checkpoints: each trial is a plain function that generates and
scores `num_images` samples in-process (cheap, many in parallel). Design sweeps (`kind: design`)
vary what needs training (tokenizer family, model flags); see `design_trial`.

`groups` lists partial settings; list values inside a group are crossed, and the union of the
groups (duplicates removed) is the sweep, so "a CFG curve for MAR-8, a steps curve at CFG 2 and a
few fusion points" is three short groups instead of one big grid.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path

import yaml

from maskgil.cluster import check_worker_group_fits
from maskgil.evaluation.generation import ModelPaths, SamplerSpec
from maskgil.training.runconfig import absolute_tracking_uri

SWEEP_KINDS = ("sampling", "design")


def expand_groups(base: dict, groups: list[dict]) -> list[dict]:
    """Union over groups of the cross product of each group's list values, over `base`; in order,
    without duplicates."""
    out, seen = [], set()
    for g in groups or [{}]:
        keys = list(g)
        values = [v if isinstance(v, list) else [v] for v in g.values()]
        for combo in itertools.product(*values):
            cfg = {**base, **dict(zip(keys, combo))}
            key = json.dumps(cfg, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(cfg)
    return out


def load_sweep(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """Read and check a sweep file; `overrides` replace top-level keys (e.g. num_images for a test)."""
    path = Path(path)
    sweep = yaml.safe_load(path.read_text()) or {}
    sweep.update(overrides or {})
    kind = sweep.get("kind")
    if kind not in SWEEP_KINDS:
        raise ValueError(f"{path}: kind must be one of {SWEEP_KINDS}, got {kind!r}")
    for key in ("name", "reference", "num_images"):
        if key not in sweep:
            raise ValueError(f"{path}: missing {key!r}")
    sweep.setdefault("metric", "fid")
    sweep.setdefault("mode", "min")
    sweep.setdefault("max_concurrent", 2)
    sweep.setdefault("cpus_per_trial", 1)
    if kind == "sampling":
        if "models" not in sweep or "tokenizer" not in sweep["models"]:
            raise ValueError(f"{path}: a sampling sweep needs models: {{tokenizer, mar and/or ar}}")
        sweep["trials"] = expand_groups(sweep.get("base", {}), sweep.get("groups", []))
        grids = {SamplerSpec.from_dict(t).grid for t in sweep["trials"]}  # fail before any trial starts
        if len(grids) > 1:  # one reference (one image size) and one token count per sweep
            raise ValueError(f"{path}: the trials sample {len(grids)} token grids ({sorted(map(str, grids))}): a sweep "
                             "scores every trial against one reference of one image size; sweep each grid on its own")
    return sweep


def result_row(trial_id: str, settings: dict, metrics: dict, n_tokens: int | None = None) -> dict:
    """One table row: the trial's sampler settings (defaults filled in) and its metrics."""
    spec = SamplerSpec.from_dict(settings)
    row = {"trial": trial_id, **dataclasses.asdict(spec)}
    row["label"] = metrics.get("sampler") or spec.label(n_tokens)
    if spec.sampler == "fusion" and n_tokens is not None:
        row["ar_tokens"] = spec.fusion_k(n_tokens)
    if spec.sampler == "ar":
        row["steps"] = None  # AR takes one step per token (model_steps); the MaskGIT step count does not apply
    for k, v in metrics.items():
        if k not in row and not isinstance(v, (dict, list)):
            row[k] = v
    return row


# ------------------------------------------------------------------------------- sampling trials

def sampling_trial(config: dict, context: dict) -> None:
    """Tune trial: evaluate one sampler setting in-process; reports the metrics once.

    `context`: models (ModelPaths fields), reference (cached reference .npz), num_images,
    classifier_dir, inception_weights, cache_dir. The sample grid and result JSON go into the
    trial directory, which the MLflow callback uploads as artifacts."""
    import torch
    from ray import tune

    from maskgil.evaluation.run import EvalConfig, evaluate

    torch.set_num_threads(int(context.get("threads", 1)))
    spec = SamplerSpec.from_dict(config["spec"])
    cfg = EvalConfig(paths=ModelPaths(**context["models"]), spec=spec, num_images=int(context["num_images"]),
                     reference=context["reference"], classifier=context.get("classifier_dir") or "none",
                     inception_weights=context.get("inception_weights"), cache_dir=context["cache_dir"],
                     grid_images=int(context.get("grid_images", 16)), prompts=context.get("prompts"))
    trial_dir = tune.get_context().get_trial_dir() or "."
    result = evaluate(cfg, engine="local", out_dir=trial_dir, tracking_uri=None, progress=False,
                      batch_size=int(context.get("batch_size", 8)))
    tune.report({k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)})


def run_sampling_sweep(sweep: dict, out_dir: str | os.PathLike, tracking_uri: str = "sqlite:///mlflow.db",
                       storage_path: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Run a sampling sweep with Ray Tune (Ray must be initialised); write the report; return it.

    One MLflow run per trial in experiment `sweep-<name>` (MLflowLoggerCallback), tagged with the
    feature network and reference."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from maskgil.evaluation.run import EvalConfig, prepare

    out_dir = Path(out_dir).resolve()
    models = {k: (str(Path(v).resolve()) if v else None) for k, v in sweep["models"].items()}
    cache_dir = str(Path(sweep.get("cache_dir", ".cache/maskgil")).resolve())
    first = SamplerSpec.from_dict(sweep["trials"][0])
    samplers = {t.get("sampler", "mar") for t in sweep["trials"]}
    paths = ModelPaths(**models)
    for s in samplers:
        paths.check(s)
    check_worker_group_fits({"CPU": float(sweep["cpus_per_trial"]), "GPU": float(sweep.get("gpus_per_trial", 0))}, 1,
                            "set gpus_per_trial: 0 to run the trials on CPUs", "cpus_per_trial / gpus_per_trial")
    probe = EvalConfig(paths=paths, spec=first, num_images=int(sweep["num_images"]), reference=sweep["reference"],
                       reference_limit=sweep.get("reference_limit"), inception_weights=sweep.get("inception_weights"),
                       classifier=sweep.get("classifier", "auto"), cache_dir=cache_dir, prompts=sweep.get("prompts"))
    prep = prepare(probe, progress=progress)  # reference features and classifier once, before the trials
    context = {"models": models, "reference": str(prep.reference_path), "num_images": int(sweep["num_images"]),
               "classifier_dir": prep.classifier_dir, "inception_weights": sweep.get("inception_weights"),
               "cache_dir": cache_dir, "batch_size": sweep.get("batch_size", 8), "threads": sweep.get("threads", 1),
               "prompts": sweep.get("prompts"),
               "grid_images": sweep.get("grid_images", 16)}
    trainable = tune.with_resources(tune.with_parameters(sampling_trial, context=context),
                                    {"cpu": float(sweep["cpus_per_trial"]), "gpu": float(sweep.get("gpus_per_trial", 0))})
    experiment = sweep.get("experiment", f"sweep-{sweep['name']}")
    callback = MLflowLoggerCallback(tracking_uri=absolute_tracking_uri(tracking_uri), experiment_name=experiment,
                                    save_artifact=True,
                                    tags={"feature_network": prep.feature_network, "reference": prep.reference.name,
                                          "sweep": sweep["name"]})
    tuner = tune.Tuner(
        trainable,
        param_space={"spec": tune.grid_search(sweep["trials"])},
        tune_config=tune.TuneConfig(metric=sweep["metric"], mode=sweep["mode"],
                                    max_concurrent_trials=int(sweep["max_concurrent"])),
        run_config=tune.RunConfig(name=sweep["name"], storage_path=str(Path(storage_path or out_dir / "ray").resolve()),
                                  callbacks=[callback], verbose=1 if progress else 0),
    )
    grid = tuner.fit()
    n_tokens = prep.info.grid[0] * prep.info.grid[1]
    rows, errors = [], []
    for res in grid:
        if res.error is not None:
            errors.append(f"{res.config.get('spec')}: {res.error}")
            continue
        rows.append(result_row(res.metrics.get("trial_id", res.path.rsplit("/", 1)[-1]), res.config["spec"],
                               res.metrics, n_tokens))
    return write_report(rows, out_dir, sweep, errors)


def write_report(rows: list[dict], out_dir: Path, sweep: dict, errors: list[str] | None = None) -> dict:
    """Tables, plots and the best setting (by its mean over seeds); printed and returned."""
    from maskgil.evaluation.report import best_setting, plot_sweep, write_tables

    if not rows:
        raise RuntimeError("no trial finished: " + "; ".join(errors or []))
    csv_path, md_path = write_tables(rows, out_dir)
    plots = plot_sweep(rows, out_dir)
    metric = sweep["metric"]
    best = best_setting(rows, metric, sweep["mode"])
    summary = {"best": best, "csv": str(csv_path), "markdown": str(md_path), "plots": [str(p) for p in plots],
               "trials": len(rows), "errors": errors or []}
    (out_dir / "best.json").write_text(json.dumps(best, indent=2, default=str) + "\n")
    print(md_path.read_text())
    seeds = f" (mean of {best['num_seeds']} seeds)" if "num_seeds" in best else ""
    print(f"best by {metric} ({sweep['mode']}): {best['label']} {metric}={best[metric]:.4g}{seeds} "
          f"[{best.get('feature_network')} vs {best.get('reference')}]")
    if errors:
        print(f"{len(errors)} trial(s) failed: " + "; ".join(errors))
    return summary

