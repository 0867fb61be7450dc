"""The whole pipeline on the embedded dataset, in one command (the README's main command).

    python pipelines/quickstart.py                 # ~15 min on 2 CPU cores; outputs under runs/quickstart/
    mlflow ui --backend-store-uri sqlite:///mlflow.db

Stages (a rerun skips the finished ones: only a stage that is asked for with --redo, was interrupted,
reads the output of a stage that was remade, or would run with other settings runs again):
  dataset     embedded shapes x colours, ImageNet folder layout, 64 px       -> runs/quickstart/dataset
  tokenizer   tiny LlamaGen-VQ (512 codes, 8x8 tokens), trained in-process    -> runs/quickstart/tokenizer
  classifier  small CNN on real images: the judge of generated samples         -> runs/quickstart/classifier
  shards      pretokenize with Ray Data (+ horizontal flips)                  -> runs/quickstart/shards
  maskgil     tiny MaskGIL, Ray Train (DDP over CPU workers)                  -> runs/quickstart/maskgil
  llamagen    tiny AR (LlamaGen-style causal), Ray Train                      -> runs/quickstart/llamagen
  samples     class grids from MAR, AR and fusion (PNG), MAR judged at CFG 2  -> runs/quickstart/samples
Every stage is an MLflow run under one parent run "quickstart".
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from maskgil.cli import HelpFormatter  # noqa: E402
from maskgil.cluster import cluster_address, init_ray  # noqa: E402
from maskgil.precision import PRECISIONS, resolve_precision  # noqa: E402
from maskgil.training.runconfig import (CONFIG_ERRORS, absolute_tracking_uri, flatten, load_run_config,  # noqa: E402
                                        parse_overrides)

STAGES = ("dataset", "tokenizer", "classifier", "shards", "maskgil", "llamagen", "samples")
# What each stage reads: a stage is recomputed whenever one of these is (the classifier trains on
# its own procedural images, so it depends on nothing).
NEEDS = {"dataset": (), "tokenizer": ("dataset",), "classifier": (), "shards": ("dataset", "tokenizer"),
         "maskgil": ("shards",), "llamagen": ("shards",),
         "samples": ("dataset", "tokenizer", "classifier", "maskgil", "llamagen")}
DONE = ".quickstart_done.json"  # a finished stage: what it made, from which inputs and settings
STARTED = ".quickstart_started.json"  # the inputs and settings a stage was last started with


def read_json(f: Path) -> dict | None:
    return json.loads(f.read_text()) if f.is_file() else None


def write_json(f: Path, info: dict) -> None:
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(info, indent=2, default=str) + "\n")


def stage_done(path: Path) -> dict | None:
    return read_json(path / DONE)


def recompute_reason(name: str, done: dict | None, settings: dict, redo: set[str], upstream: dict[str, str]) -> str | None:
    """Why stage `name` must run again, or None when its finished output can be reused: it was
    asked for (--redo), never finished, a stage it reads was remade since (`upstream`: the ids of
    their finished outputs now), or it was made with other settings."""
    if name in redo:
        return "--redo"
    if done is None:
        return "not done yet"
    changed = [s for s, ident in upstream.items() if done.get("inputs", {}).get(s) != ident]
    if changed:
        return f"{', '.join(changed)} changed since"
    before = done.get("settings")
    if before is None:
        return "made by an older quickstart (no settings recorded)"
    old, new = flatten(before), flatten(settings)
    diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    if diff:
        return "settings changed: " + "; ".join(diff)
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="root of the stage outputs")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--redo", nargs="*", default=[], choices=STAGES + ("all",), help="stages to recompute")
    p.add_argument("--n-train", type=int, default=4096, help="embedded training images")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the tokenizer, the generators (train.seed; --set wins) and the samples. The judge "
                        "keeps its own fixed seed: it is the measuring instrument, the same for every seed")
    p.add_argument("--tokenizer-preset", default="llamagen-vq-tiny",
                   help="tiny tokenizer family (see maskgil.tokenizers.presets); generators follow its codebook size")
    p.add_argument("--tokenizer-steps", type=int, default=1000)
    p.add_argument("--tokenizer-minutes", type=float, default=4.0, help="time cap of tokenizer training")
    p.add_argument("--tokenizer-precision", choices=PRECISIONS, default="auto",
                   help="tokenizer training in fp32, bf16 autocast (quantizer in fp32), or auto: bf16 where the "
                        "hardware multiplies bf16 natively (AMX / AVX512-BF16 CPUs, CUDA), else fp32. bf16 "
                        "trains the tokenizer in ~60%% of the fp32 time; with code noise its MAR samples scored "
                        "87.5-96.5%% over five seeds (mean 92.7%%), fp32's 91.4-95.3%% (mean 93.3%%): within the "
                        "spread of the generators' own seed (docs/quickstart_runs.md)")
    p.add_argument("--tokenizer-code-noise", type=float, default=0.1,
                   help="probability that a decoder input code is swapped for a random one in tokenizer training. "
                        "The decoder then keeps shapes intact around a generator's wrong tokens: without it the MAR "
                        "score depended on the tokenizer's seed (91-95%% vs 81-83%%); with 0.1 five seeds gave 87.5-96.5%% "
                        "in bf16 and 91.4-95.3%% in fp32 (docs/quickstart_runs.md). 0 turns it off")
    p.add_argument("--classifier-steps", type=int, default=300,
                   help="judge training steps (300: 100%% on real val images and their reconstructions, like 600)")
    p.add_argument("--maskgil-config", default=str(ROOT / "ray_configs/train_maskgil_tiny.yaml"))
    p.add_argument("--llamagen-config", default=str(ROOT / "ray_configs/train_llamagen_tiny.yaml"))
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="overrides for both generator runs, e.g. train.max_steps=300")
    p.add_argument("--samples-per-class", type=int, default=16, help="MAR samples per class for the accuracy judge")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--fusion-ar-tokens", type=int, default=32, help="AR share of the 64 tokens in fusion sampling")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers per generator run")
    p.add_argument("--require-target", action="store_true",
                   help="exit 1 unless MAR class accuracy (at --cfg-scale) reaches 80%% (for CI-style checks)")
    p.add_argument("--dashboard", action="store_true",
                   help="start Ray's dashboard with the local instance (its processes take ~5%% of a core)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads in this process")
    args = p.parse_args(argv)
    try:  # a bad run file or --set stops here, not minutes later when the generator stage reads it
        overrides = parse_overrides(args.set)
        for config in (args.maskgil_config, args.llamagen_config):
            load_run_config(config, overrides)
    except CONFIG_ERRORS as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import mlflow
    import ray

    out = Path(args.out).resolve()
    redo = set(STAGES) if "all" in args.redo else set(args.redo)
    dirs = {s: out / s for s in STAGES}
    uri = absolute_tracking_uri(args.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("maskgil-quickstart")
    times: dict[str, float] = {}
    summary: dict = {}
    t_all = time.time()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        init_ray(cluster_address(), log_to_driver=False, include_dashboard=args.dashboard,
                 dashboard_host="127.0.0.1")
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    except Exception:  # older Ray: bars stay on
        pass

    with mlflow.start_run(run_name="quickstart") as parent:
        mlflow.log_params({k: v for k, v in vars(args).items() if k not in ("redo", "set")} | {"set": " ".join(args.set)})

        def run_stage(name, fn, settings: dict):
            path = dirs[name]
            done = stage_done(path)
            inputs = {s: summary[s]["id"] for s in NEEDS[name]}
            reason = recompute_reason(name, done, settings, redo, inputs)
            if reason is None and name == "tokenizer" and tokenizer_wants_more(done, args):
                reason = f"continuing from step {done.get('steps', 0)} to {args.tokenizer_steps}"
            if reason is None:
                print(f"[{name}] already complete in {path} (use --redo {name} to recompute)")
                summary[name] = done
                times[name] = 0.0
                return done
            # Partial work (a tokenizer train state, a Ray Train run) is continued only when it was
            # started from the same inputs and settings; otherwise the stage starts over.
            started = {"settings": settings, "inputs": inputs}
            resume = name not in redo and read_json(path / STARTED) == started
            if resume and done is None:
                reason = "resuming an interrupted run"
            print(f"\n[{name}] ... ({reason})", flush=True)
            (path / DONE).unlink(missing_ok=True)  # an interrupted recompute must not look finished
            write_json(path / STARTED, started)
            t0 = time.time()
            info = fn(path, resume) or {}
            times[name] = time.time() - t0
            # `id` names this output; the stages that read it record it under "inputs".
            info.update(seconds=round(times[name], 1), settings=settings, inputs=inputs, id=uuid.uuid4().hex)
            write_json(path / DONE, info)
            summary[name] = info
            mlflow.log_metric(f"stage_seconds.{name}", times[name])
            print(f"[{name}] done in {times[name]:.0f}s", flush=True)
            return info

        run_stage("dataset", lambda p, resume: stage_dataset(p, args), {"n_train": args.n_train})
        run_stage("tokenizer", lambda p, resume: stage_tokenizer(p, args, resume),
                  {"preset": args.tokenizer_preset, "precision": resolve_precision(args.tokenizer_precision, "cpu"),
                   "seed": args.seed, "code_noise": args.tokenizer_code_noise})
        run_stage("classifier", lambda p, resume: stage_classifier(p, args), {"steps": args.classifier_steps})
        run_stage("shards", lambda p, resume: stage_shards(p, dirs), {})
        for kind in ("maskgil", "llamagen"):
            cfg = generator_config(kind, args, dirs, uri, parent.info.run_id)
            run_stage(kind, lambda p, resume, cfg=cfg: stage_generator(cfg, resume), generator_settings(cfg))
        res = run_stage("samples", lambda p, resume: stage_samples(p, args, dirs),
                        {"samples_per_class": args.samples_per_class, "cfg_scale": args.cfg_scale,
                         "fusion_ar_tokens": args.fusion_ar_tokens, "seed": args.seed})
        total = time.time() - t_all
        mlflow.log_metric("total_seconds", total)
        for k in ("mar_accuracy", "mar_colour_accuracy", "mar_shape_accuracy", "ar_accuracy", "fusion_accuracy",
                  "recon_accuracy_20pct_wrong_codes"):
            if k in res:
                mlflow.log_metric(k, res[k])
        for shape, acc in res.get("mar_shape_accuracy_by_shape", {}).items():
            mlflow.log_metric(f"mar_shape_accuracy.{shape}", acc)
        for png in sorted(dirs["samples"].glob("*.png")):
            mlflow.log_artifact(str(png), "samples")
    print_summary(summary, times, total, dirs, uri, args.cfg_scale)
    met = res.get("mar_accuracy", 0) >= 0.8
    if not met:
        print(f"quickstart target (MAR class accuracy >= 80% at CFG {args.cfg_scale:g}) NOT met; "
              "the pipeline itself completed")
    return 1 if (args.require_target and not met) else 0


# ------------------------------------------------------------------------------------------ stages
def stage_dataset(path: Path, args) -> dict:
    from maskgil.data.embedded import write_imagenet_folder

    for split in ("train", "val"):  # a smaller --n-train must not leave the last run's extra images behind
        shutil.rmtree(path / split, ignore_errors=True)
    write_imagenet_folder(path, n_train=args.n_train, n_val=512, size=64, seed=0)
    return {"n_train": args.n_train, "n_val": 512, "size": 64, "train_dir": str(path / "train")}


def load_folder_images(folder: Path) -> np.ndarray:
    """uint8 (N, H, W, 3) from an ImageNet-layout folder (the same files pretokenize reads)."""
    from PIL import Image

    files = sorted(folder.rglob("*.JPEG")) or sorted(folder.rglob("*.jp*g")) or sorted(folder.rglob("*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def tokenizer_train_config(args):
    """The tokenizer recipe: the preset's CPU defaults with pixel L2 + VQ terms only. On 2 CPU cores
    the Inception perceptual loss costs ~10x a step and the GAN starts after this budget anyway;
    8x8 codes of flat-coloured shapes need neither."""
    from maskgil.tokenizers.training import default_train_config

    return default_train_config(args.tokenizer_preset, perceptual="none", perceptual_weight=0.0, disc_weight=0.0,
                                precision=args.tokenizer_precision, seed=args.seed,
                                code_noise=args.tokenizer_code_noise)


def stage_tokenizer(path: Path, args, resume: bool) -> dict:
    """Train the tiny VQ tokenizer, or continue its saved train state (saved every 200 steps)."""
    import mlflow

    from maskgil.metrics.image_quality import psnr
    from maskgil.tokenizers.training import TRAIN_STATE_NAME, TokenizerTrainer, save_recon_grid, train_tokenizer

    images = load_folder_images(path.parent / "dataset" / "train")
    val = load_folder_images(path.parent / "dataset" / "val")[::2][:256]
    cfg = tokenizer_train_config(args)
    state = path / TRAIN_STATE_NAME
    resumed = resume and state.is_file()
    if not resumed:
        state.unlink(missing_ok=True)
    trainer = TokenizerTrainer.resume(path) if resumed else TokenizerTrainer(cfg)
    with mlflow.start_run(run_name="tokenizer", nested=True):
        mlflow.log_params({f"tokenizer.{k}": v for k, v in vars(cfg).items()}
                          | {"resumed_from_step": trainer.step, "tokenizer.precision_used": trainer.precision})

        def log(tr, m):
            mlflow.log_metrics({k: float(v) for k, v in m.items() if isinstance(v, (int, float))}, step=tr.step)
            if tr.step % 200 == 0:
                tr.save(path)

        tok, history = train_tokenizer(cfg, images, steps=args.tokenizer_steps, trainer=trainer, log_every=50,
                                       callback=log, time_limit_s=args.tokenizer_minutes * 60)
        trainer.save(path)
        with torch.no_grad():
            rec = torch.cat([tok.reconstruct(val[i:i + 128]) for i in range(0, len(val), 128)])
            ref = torch.from_numpy(val).permute(0, 3, 1, 2).float() / 127.5 - 1
            val_psnr = float(psnr(rec, ref, data_range=2.0).mean())
        grid = save_recon_grid(tok, val[::16][:8], path / "reconstructions.png")
        mlflow.log_metric("val_psnr", val_psnr)
        mlflow.log_artifact(str(grid))
    capped = trainer.step < args.tokenizer_steps
    if capped:
        print(f"[tokenizer] stopped by --tokenizer-minutes {args.tokenizer_minutes:g} at step {trainer.step} of "
              f"{args.tokenizer_steps}; a rerun continues it only with more --tokenizer-minutes or --tokenizer-steps",
              flush=True)
    return {"preset": args.tokenizer_preset, "precision": trainer.precision, "steps": trainer.step,
            "val_psnr_db": round(val_psnr, 2),
            "codebook_usage": history[-1].get("usage_window") if history else None,
            "time_capped": capped, "steps_asked": args.tokenizer_steps, "minutes_cap": args.tokenizer_minutes}


def tokenizer_wants_more(done: dict, args) -> bool:
    """A finished tokenizer stage is continued when it stopped short of --tokenizer-steps, except
    when --tokenizer-minutes stopped it and the same steps and cap are asked again (that rerun
    would train a few more minutes and redo every stage after it)."""
    if done.get("steps", 0) >= args.tokenizer_steps:
        return False
    return not (done.get("time_capped") and done.get("steps_asked") == args.tokenizer_steps
                and args.tokenizer_minutes <= done.get("minutes_cap", 0))


def stage_classifier(path: Path, args) -> dict:
    from maskgil.classifier import train_embedded_classifier

    _, acc = train_embedded_classifier(path, image_size=64, steps=args.classifier_steps)
    return {"val_accuracy": acc}


def stage_shards(path: Path, dirs) -> dict:
    from maskgil.data.pretokenize import PretokenizeConfig, run_pretokenize

    # Two tokenizer actors of 0.75 CPU next to the decode tasks' 0.5 fill both cores: 30 s instead of
    # 40 s with one actor of 1 CPU, the same 8,192 rows (encoding is the bottleneck: ~34 s on one core).
    cfg = PretokenizeConfig(source=str(dirs["dataset"] / "train"), format="imagenet", out=str(path),
                            tokenizer=str(dirs["tokenizer"]), image_size=64, augment="flip", rows_per_shard=1024,
                            num_tokenizers=2, cpus_per_tokenizer=0.75, batch_size=128)
    s = run_pretokenize(cfg, progress=False)
    if not s.get("complete"):
        raise RuntimeError(f"pretokenize did not complete: {s}")
    return {k: s.get(k) for k in ("rows_written", "inputs_seen", "inputs_quarantined", "reconciled")}


def generator_config(kind: str, args, dirs, uri: str, parent_id: str) -> dict:
    """The Ray Train run config of a generator stage: the run file, --set, and the paths and
    codebook size of this quickstart."""
    from maskgil.data.shards import read_manifest

    path = dirs[kind]
    config = args.maskgil_config if kind == "maskgil" else args.llamagen_config
    over = parse_overrides(args.set)
    over.setdefault("data", {})["shards"] = str(dirs["shards"])
    codebook = read_manifest(str(dirs["shards"]))["codebook_size"]
    # model_overrides merge field by field (load_run_config): the run file's shape, --set's, the codebook
    over.setdefault("train", {}).setdefault("model_overrides", {})["vocab_size"] = codebook
    run = over.setdefault("run", {})
    run.update(output=str(path), tokenizer=str(dirs["tokenizer"]), tracking_uri=uri, experiment="maskgil-quickstart",
               name=f"quickstart-{kind}", storage_path=str(path.parent / "ray_train"),
               tags={"mlflow.parentRunId": parent_id})
    over.setdefault("scaling", {}).setdefault("num_workers", args.num_workers)
    over.setdefault("train", {}).setdefault("seed", args.seed)
    return load_run_config(config, over)


def generator_settings(cfg: dict) -> dict:
    """What a generator's weights depend on besides its shards (not where it logs or writes)."""
    return json.loads(json.dumps({k: cfg[k] for k in ("train", "data", "scaling")}, default=str))


def stage_generator(cfg: dict, resume: bool) -> dict:
    """Train with Ray Train, continuing this stage's earlier Ray Train run (and MLflow run) only
    when `resume`: otherwise that run is forgotten and training starts at step 0."""
    from maskgil.training.ray_trainer import run_training

    if not resume:
        shutil.rmtree(Path(cfg["run"]["storage_path"]) / cfg["run"]["name"], ignore_errors=True)
    res = run_training(cfg, verbose=0)
    m = res.get("metrics", {})
    return {"step": res["step"], "final_loss": m.get("loss"), "run_id": res["run_id"], "checkpoint": res["checkpoint"]}


def stage_samples(path: Path, args, dirs) -> dict:
    from maskgil.checkpoint import load_pretrained
    from maskgil.classifier import class_accuracy, load_embedded_classifier
    from maskgil.images import image_grid, save_png
    from maskgil.tokenizers import load_tokenizer
    from maskgil.tokenizers.evaluate import evaluate_tokenizer
    from maskgil.training.samples import decode_tokens, sample_tokens

    tok = load_tokenizer(dirs["tokenizer"])
    mar, ar = load_pretrained(dirs["maskgil"]), load_pretrained(dirs["llamagen"])
    judge = load_embedded_classifier(dirs["classifier"])
    grid = tuple(mar.config.grid_size)
    classes = list(range(mar.config.num_classes))
    out = {}
    timings = {}
    # The ceiling: how the judge scores the tokenizer's reconstructions of real held-out images; and
    # how well the decoder keeps shapes with 20 % of the codes random, as a generator's never are all
    # right. That second figure told apart the tokenizers that gave good and poor MAR samples when
    # their clean reconstructions all scored 100 % (docs/quickstart_runs.md).
    files = sorted((dirs["dataset"] / "val").rglob("*.JPEG"))
    val = load_folder_images(dirs["dataset"] / "val")
    val_labels = np.array([int(f.parent.name.split("_")[0]) for f in files])
    ev = evaluate_tokenizer(tok, val, batch_size=128, rfid=False, labels=val_labels, classifier=judge, wrong_codes=0.2)
    out.update(real_val_accuracy=ev["original_accuracy"], recon_accuracy=ev["recon_accuracy"],
               recon_colour_accuracy=ev["recon_colour_accuracy"], recon_shape_accuracy=ev["recon_shape_accuracy"],
               recon_accuracy_20pct_wrong_codes=ev["wrong_codes_accuracy"])
    for name, kw, n in (("mar", dict(model=mar), args.samples_per_class),
                        ("ar", dict(model=ar), 4),
                        ("fusion", dict(model=mar, ar_model=ar, ar_tokens=args.fusion_ar_tokens), 4)):
        t0 = time.time()
        tokens, labels = sample_tokens(kw.pop("model"), classes, n, grid, cfg_scale=args.cfg_scale, steps=8,
                                       seed=1 + args.seed,
                                       **kw)
        labels = np.asarray(labels)
        timings[name] = time.time() - t0
        images = decode_tokens(tok, tokens, grid)
        scores = class_accuracy(judge, images, labels)
        out[f"{name}_accuracy"] = scores["accuracy"]
        out[f"{name}_colour_accuracy"] = scores["colour_accuracy"]
        out[f"{name}_shape_accuracy"] = scores["shape_accuracy"]
        out[f"{name}_shape_accuracy_by_shape"] = scores["shape_accuracy_by_shape"]
        out[f"{name}_n"] = len(labels)
        out[f"{name}_sample_seconds"] = round(timings[name], 1)
        # PNG: the first (up to) 4 samples of each class, 8 per row
        keep = np.concatenate([np.arange(c * n, c * n + min(n, 4)) for c in range(len(classes))])
        big = np.kron(image_grid(images[keep], ncol=8), np.ones((2, 2, 1), np.uint8))  # 2x nearest upscale
        save_png(big, path / f"{name}_cfg{args.cfg_scale:g}.png")
    return out


def print_summary(summary: dict, times: dict, total: float, dirs: dict, uri: str, cfg_scale: float) -> None:
    print("\n" + "=" * 72)
    print("MaskGIL quickstart summary")
    print("=" * 72)
    for s in STAGES:
        info = summary.get(s, {})
        shown = {k: v for k, v in info.items()
                 if k not in ("seconds", "run_id", "checkpoint", "train_dir", "settings", "inputs", "id")}
        secs = info.get("seconds", 0.0)
        cached = " (cached: time of the run that made it)" if times.get(s, 0.0) == 0.0 else ""
        print(f"{s:<11} {secs:7.1f}s  {json.dumps(shown, default=str)[:160]}{cached}")
    print(f"{'total':<11} {total:7.1f}s  this invocation's wall time")
    r = summary.get("samples", {})
    if r:
        print(f"\nMAR class accuracy at CFG {cfg_scale:g}: {r['mar_accuracy']:.1%} (colour {r['mar_colour_accuracy']:.1%}, "
              f"shape {r['mar_shape_accuracy']:.1%}; {r['mar_n']} samples, target >= 80%)")
        by_shape = r.get("mar_shape_accuracy_by_shape", {})
        if by_shape:
            print("MAR shape accuracy by true shape: " + ", ".join(f"{k} {v:.0%}" for k, v in by_shape.items()))
        print(f"AR {r['ar_accuracy']:.1%}, fusion {r['fusion_accuracy']:.1%} ({r['ar_n']} samples each)")
        print(f"judge on real val images {r['real_val_accuracy']:.1%}, on their tokenizer reconstructions "
              f"{r['recon_accuracy']:.1%} (the ceiling for generated samples), with 20% of their codes random "
              f"{r['recon_accuracy_20pct_wrong_codes']:.1%} (the decoder's robustness to wrong tokens)")
    print(f"\nsample grids: {dirs['samples']}/*.png   checkpoints: {dirs['maskgil']}, {dirs['llamagen']}, "
          f"{dirs['tokenizer']}")
    print(f"compare runs: mlflow ui --backend-store-uri {uri}")


if __name__ == "__main__":
    sys.exit(main())
