"""Design sweeps: knobs that need training (tokenizer family, QK-Norm, Post-Norm, RoPE kind,
MaskGIL vs the Bidirectional Transformer baseline vs causal AR).

How Tune and Train V2 combine (DESIGN sec. 7: `Tuner(TorchTrainer)` no longer works): each trial
is a plain function that trains in *rungs*. At rung r it calls `run_training` (which builds and
fits a `TorchTrainer` named after the trial) up to `rungs[r]` steps — a rerun with the same
name and storage resumes from the previous rung's checkpoint — then scores the checkpoint
(`num_images` samples, FID etc.) and `tune.report`s. ASHA compares trials at the rungs and stops
the weak ones. Rungs need a learning-rate schedule that does not depend on the final step, so
the sweep trains with a constant rate after warmup unless the sweep file says otherwise.

Token shards are written once per tokenizer on the driver before the trials start (pretokenize
resumes: finished shards are reused), so trials that share a tokenizer never race on them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from maskgil.cluster import check_worker_group_fits
from maskgil.evaluation.generation import ModelPaths, SamplerSpec
from maskgil.evaluation.sweep import expand_groups
from maskgil.training.runconfig import absolute_tracking_uri, load_run_config, worker_resources

DESIGN_KEYS = ("tokenizer", "preset", "model")
DESIGN_COLUMNS = ("trial", "tokenizer", "preset", "model", "rungs_done", "step", "fid", "precision", "recall",
                  "class_accuracy", "colour_accuracy", "shape_accuracy", "seconds_per_image")


def load_design(sweep: dict) -> dict:
    """Check a `kind: design` sweep and expand its trials ({tokenizer, preset, model})."""
    for key in ("tokenizers", "train_config", "rungs", "dataset"):
        if key not in sweep:
            raise ValueError(f"design sweep {sweep.get('name')!r}: missing {key!r}")
    rungs = [int(r) for r in sweep["rungs"]]
    if not rungs or rungs != sorted(set(rungs)) or rungs[0] < 1:
        raise ValueError(f"rungs must be increasing positive step counts, got {sweep['rungs']}")
    sweep["rungs"] = rungs
    trials = expand_groups(sweep.get("base", {}), sweep.get("groups", []))
    for t in trials:
        bad = sorted(set(t) - set(DESIGN_KEYS))
        if bad:
            raise ValueError(f"unknown design setting(s) {bad}; known: {list(DESIGN_KEYS)}")
        if t.get("tokenizer") not in sweep["tokenizers"]:
            raise ValueError(f"trial {t}: tokenizer {t.get('tokenizer')!r} is not one of {sorted(sweep['tokenizers'])}")
        t.setdefault("preset", "maskgil-tiny")
        t.setdefault("model", {})
        try:  # the trial's whole run config, paths as placeholders: a mistake stops the sweep before it starts
            trial_run_config(sweep["train_config"], t, rungs[-1], "-", 2, "check", "-", "-", "sqlite:///check.db",
                             "check", "-", sweep.get("train_overrides"), sweep.get("scaling"))
        except ValueError as e:
            raise ValueError(f"trial {t}: {e}") from None
    sweep["trials"] = trials
    return sweep


def trial_run_config(train_config: str, trial: dict, steps: int, shards: str, codebook_size: int, name: str,
                     storage: str, output: str, tracking_uri: str, experiment: str, tokenizer_dir: str,
                     train_overrides: dict | None = None, scaling: dict | None = None) -> dict:
    """The training run config of one rung of one trial (validated by the training code). The trial's
    model is its preset with the trial's flags: the base file's model_overrides (e.g. a half-width
    tiny model) are replaced, not merged, so every preset of a sweep trains at its own shape."""
    train = {"lr_schedule": "constant", **(train_overrides or {}), "max_steps": steps}
    overrides = {"train": train, "data": {"shards": shards},
                 "run": {"name": name, "storage_path": storage, "output": output, "tracking_uri": tracking_uri,
                         "experiment": experiment, "tokenizer": tokenizer_dir,
                         "tags": {"maskgil.sweep_trial": name}}}
    if scaling:
        overrides["scaling"] = scaling
    cfg = load_run_config(train_config, overrides)
    cfg["train"].update(preset=trial["preset"], model_overrides={**trial["model"], "vocab_size": codebook_size})
    return load_run_config(None, cfg)  # checked again with the trial's model


def prepare_shards(sweep: dict, root: Path, progress: bool = True) -> dict[str, str]:
    """{tokenizer name: shard dir}, pretokenizing the dataset once per tokenizer that a trial uses."""
    from maskgil.checkpoint import weights_hash
    from maskgil.data.pretokenize import PretokenizeConfig, run_pretokenize
    from maskgil.data.shards import read_manifest

    used = sorted({t["tokenizer"] for t in sweep["trials"]})
    given = sweep.get("shards") or {}
    out = {}
    for name in used:
        if name in given:  # shards written earlier (e.g. by the quickstart) with this tokenizer
            want = weights_hash(sweep["tokenizers"][name])
            got = read_manifest(given[name])["tokenizer"]["weights_sha256"]
            if got != want:
                raise ValueError(f"shards {given[name]} were written by tokenizer weights {got[:12]}, "
                                 f"not {name} ({want[:12]})")
            out[name] = str(Path(given[name]).resolve())
            continue
        shard_dir = root / "shards" / name
        cfg = PretokenizeConfig(source=str(Path(sweep["dataset"]) / "train") if (Path(sweep["dataset"]) / "train").is_dir()
                                else sweep["dataset"], format=sweep.get("source_format", "imagenet"), out=str(shard_dir),
                                tokenizer=sweep["tokenizers"][name], image_size=int(sweep.get("image_size", 64)),
                                cpus_per_tokenizer=float(sweep.get("pretokenize_cpus", 1)))
        run_pretokenize(cfg, progress=progress)  # resumes: shards already written are kept
        out[name] = str(shard_dir)
    return out


def design_trial(config: dict, context: dict) -> None:
    """Tune trial: train in rungs, score each rung's checkpoint, report to ASHA."""
    import torch
    from ray import tune

    from maskgil.data.shards import read_manifest
    from maskgil.evaluation.run import EvalConfig, evaluate
    from maskgil.models import preset_config
    from maskgil.training.ray_trainer import run_training

    torch.set_num_threads(int(context.get("threads", 1)))
    trial = config["design"]
    ctx = tune.get_context()
    name = f"{context['name']}-{ctx.get_trial_id()}"
    trial_dir = Path(ctx.get_trial_dir() or ".")
    tok_dir = context["tokenizers"][trial["tokenizer"]]
    shards = context["shards"][trial["tokenizer"]]
    codebook = int(read_manifest(shards)["codebook_size"])
    causal = bool(getattr(preset_config(trial["preset"]), "causal", False))
    spec = SamplerSpec.from_dict({**context.get("sampler", {}), **({"sampler": "ar"} if causal else {})})
    for rung, steps in enumerate(context["rungs"]):
        cfg = trial_run_config(context["train_config"], trial, steps, shards, codebook, name, context["storage"],
                               str(trial_dir / "final"), context["tracking_uri"], context["train_experiment"], tok_dir,
                               context.get("train_overrides"), context.get("scaling"))
        trained = run_training(cfg, verbose=0)
        paths = ModelPaths(tokenizer=tok_dir, **({"ar": trained["checkpoint"]} if causal else {"mar": trained["checkpoint"]}))
        ev = EvalConfig(paths=paths, spec=spec, num_images=int(context["num_images"]), reference=context["reference"],
                        classifier=context.get("classifier_dir") or "none", cache_dir=context["cache_dir"],
                        inception_weights=context.get("inception_weights"), grid_images=16)
        result = evaluate(ev, engine="local", out_dir=trial_dir / f"rung{rung}", tracking_uri=None, progress=False)
        report = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        loss = {k: v for k, v in (trained.get("metrics") or {}).items() if isinstance(v, (int, float))}
        report.update({f"train_{k}": v for k, v in loss.items()}, step=int(trained["step"] or steps), rung=rung,
                      training_run_id=trained["run_id"], checkpoint=trained["checkpoint"])
        (trial_dir / f"rung{rung}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        tune.report(report)


def run_design_sweep(sweep: dict, out_dir: str | os.PathLike, tracking_uri: str = "sqlite:///mlflow.db",
                     storage_path: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Pretokenize per tokenizer, then Tune with ASHA over the design trials; report at the end."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    from maskgil.evaluation.reference import load_reference
    from maskgil.evaluation.report import write_tables
    from maskgil.evaluation.run import resolve_classifier
    from maskgil.metrics import InceptionFeatureExtractor
    from maskgil.tokenizers import load_tokenizer

    sweep = load_design(sweep)
    # One trial holds its own slot and its Ray Train worker group: both must fit the cluster.
    scaling = load_run_config(sweep["train_config"], {"scaling": sweep.get("scaling") or {}})["scaling"]
    group = {k: v * int(scaling["num_workers"]) for k, v in worker_resources(scaling).items()}
    need = {"CPU": float(sweep.get("cpus_per_trial", 0.25)) + group["CPU"],
            "GPU": float(sweep.get("gpus_per_trial", 0)) + group.get("GPU", 0.0)}
    check_worker_group_fits(need, 1, "set gpus_per_trial: 0 and scaling: {use_gpu: false} to run on CPUs",
                            "cpus_per_trial / gpus_per_trial / scaling")
    out_dir = Path(out_dir).resolve()
    storage = Path(storage_path or out_dir / "ray").resolve()
    tokenizers = {k: str(Path(v).resolve()) for k, v in sweep["tokenizers"].items()}
    sweep["tokenizers"] = tokenizers
    shards = prepare_shards(sweep, out_dir, progress)
    cache_dir = str(Path(sweep.get("cache_dir", ".cache/maskgil")).resolve())
    size = int(sweep.get("image_size", 64))
    down = load_tokenizer(next(iter(tokenizers.values()))).downsample
    if size % down:
        raise ValueError(f"image_size {size} is not a multiple of the tokenizer downsample {down}")
    extractor = InceptionFeatureExtractor(sweep.get("inception_weights"))
    reference, ref_path = load_reference(sweep["reference"], (size, size), extractor, cache_dir,
                                         limit=sweep.get("reference_limit"), progress=progress)
    from maskgil.models import preset_config

    num_classes = preset_config(sweep["trials"][0]["preset"]).num_classes
    classifier = resolve_classifier(sweep.get("classifier", "auto"), num_classes, size, cache_dir)
    uri = absolute_tracking_uri(tracking_uri)
    context = {"name": sweep["name"], "tokenizers": tokenizers, "shards": shards, "rungs": sweep["rungs"],
               "train_config": str(Path(sweep["train_config"]).resolve()), "storage": str(storage / "train"),
               "tracking_uri": uri, "train_experiment": sweep.get("train_experiment", f"sweep-{sweep['name']}-train"),
               "train_overrides": sweep.get("train_overrides"), "scaling": sweep.get("scaling"),
               "sampler": sweep.get("sampler", {}), "num_images": int(sweep["num_images"]),
               "reference": str(ref_path), "classifier_dir": classifier, "cache_dir": cache_dir,
               "inception_weights": sweep.get("inception_weights"),
               "threads": sweep.get("threads", 1)}
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=len(sweep["rungs"]),
                              grace_period=int(sweep.get("grace_rungs", 1)),
                              reduction_factor=float(sweep.get("reduction_factor", 2)))
    trainable = tune.with_resources(tune.with_parameters(design_trial, context=context),
                                    {"cpu": float(sweep.get("cpus_per_trial", 0.25)), "gpu": float(sweep.get("gpus_per_trial", 0))})
    callback = MLflowLoggerCallback(tracking_uri=uri, experiment_name=sweep.get("experiment", f"sweep-{sweep['name']}"),
                                    save_artifact=True, tags={"feature_network": extractor.feature_network,
                                                              "reference": reference.name, "sweep": sweep["name"]})
    tuner = tune.Tuner(trainable, param_space={"design": tune.grid_search(sweep["trials"])},
                       tune_config=tune.TuneConfig(metric=sweep.get("metric", "fid"), mode=sweep.get("mode", "min"),
                                                   scheduler=scheduler,
                                                   max_concurrent_trials=int(sweep.get("max_concurrent", 1))),
                       run_config=tune.RunConfig(name=sweep["name"], storage_path=str(storage), callbacks=[callback],
                                                 verbose=1 if progress else 0))
    grid = tuner.fit()
    rows, errors = [], []
    for res in grid:
        if res.error is not None:
            errors.append(f"{res.config.get('design')}: {res.error}")
            continue
        d = res.config["design"]
        row = {"trial": res.metrics.get("trial_id", res.path.rsplit("/", 1)[-1]), "tokenizer": d["tokenizer"], "preset": d["preset"],
               "model": json.dumps(d["model"], sort_keys=True), "rungs_done": res.metrics.get("rung", -1) + 1}
        row.update({k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str)) and k not in row})
        rows.append(row)
    if not rows:
        raise RuntimeError("no design trial finished: " + "; ".join(errors))
    csv_path, md_path = write_tables(rows, out_dir, columns=DESIGN_COLUMNS)
    metric, sign = sweep.get("metric", "fid"), (1 if sweep.get("mode", "min") == "min" else -1)
    best = min((r for r in rows if r.get(metric) is not None), key=lambda r: sign * r[metric])
    (out_dir / "best.json").write_text(json.dumps(best, indent=2, default=str) + "\n")
    print(md_path.read_text())
    print(f"best by {metric}: {best['preset']} {best['model']} on {best['tokenizer']}: {metric}={best[metric]:.4g} "
          f"[{best.get('feature_network')} vs {best.get('reference')}]")
    return {"best": best, "csv": str(csv_path), "markdown": str(md_path), "plots": [], "trials": len(rows),
            "errors": errors}
