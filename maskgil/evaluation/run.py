"""One evaluation: generate N samples, score them against a reference, report and log.

`evaluate(cfg, engine="ray")` runs generation as a Ray Data job (class plan as the dataset, a
sampler+decoder actor pool, then a feature-extractor actor pool, streamed into the driver);
`engine="local"` runs the same two workers in-process on the same plan (Tune trials, tests).
The driver never holds the images: it keeps 2,048 float32 features per sample (8 KB, what
precision/recall needs), the first `grid_images` images for the PNG grid, and streams the rest
into the ADM `.npz` when asked.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from maskgil.evaluation.adm_npz import AdmNpzWriter
from maskgil.evaluation.generation import (
    ModelPaths,
    SampleAndDecode,
    SamplerSpec,
    ScoreImages,
    check_balanced,
    num_chunks,
)
from maskgil.images import image_grid, save_png

DEFAULT_CACHE_DIR = ".cache/maskgil"


@dataclasses.dataclass
class EvalConfig:
    paths: ModelPaths
    spec: SamplerSpec
    num_images: int
    reference: str  # folder of real images or .npz (see maskgil.evaluation.reference)
    reference_limit: int | None = None
    adm_stats: str = "reextract"
    inception_weights: str | None = None  # torch-fidelity weights file (then IS too); None = fid-helper
    classifier: str = "auto"  # auto (embedded set: cached or trained on the fly) | none | checkpoint dir
    npz: str | None = None  # ADM-style sample export
    grid_images: int = 64
    cache_dir: str = DEFAULT_CACHE_DIR
    k: int = 3  # precision/recall neighbourhood
    prompts: str | None = None  # text-conditional models: a prompt set (maskgil.evaluation.prompts)


@dataclasses.dataclass
class GeneratorInfo:
    num_classes: int
    grid: tuple[int, int]
    image_hw: tuple[int, int]
    cond: str = "class"


def generator_info(paths: ModelPaths, sampler: str, grid: tuple[int, int] | None = None) -> GeneratorInfo:
    """Classes, token grid and image size of the models, read without loading the generators;
    `grid` overrides the checkpoint's (sampling at another resolution or aspect ratio)."""
    from maskgil.checkpoint import read_config
    from maskgil.tokenizers import load_tokenizer

    paths.check(sampler)
    cfg = read_config(paths.primary(sampler))["config"]
    grid = tuple(grid or cfg["grid_size"])
    down = load_tokenizer(paths.tokenizer).downsample
    return GeneratorInfo(int(cfg["num_classes"]), grid, (grid[0] * down, grid[1] * down), cfg.get("cond", "class"))


@functools.lru_cache(maxsize=8)
def prompt_set(spec: str, image_size: int):
    from maskgil.evaluation.prompts import load_prompts

    return load_prompts(spec, image_size)


# ----------------------------------------------------------------------------------- classifier

def check_classifier_choice(choice: str) -> str:
    """`choice` ("auto", "none" or a checkpoint directory), refused when it names no checkpoint."""
    if choice not in ("auto", "none") and not (Path(choice) / "config.json").is_file():
        raise FileNotFoundError(f"--classifier {choice}: not a checkpoint directory")
    return choice


def resolve_classifier(choice: str, num_classes: int, image_size: int, cache_dir: str | os.PathLike,
                       train_steps: int = 600) -> str | None:
    """Checkpoint dir of the embedded-set classifier to use, or None.

    'auto': only for embedded-set generators (16 classes); reuses `<cache_dir>/embedded-classifier-<size>`
    or trains it there once (about a minute on 2 idle cores)."""
    from maskgil.data.embedded import NUM_CLASSES

    if choice == "none":
        return None
    if choice != "auto":
        return check_classifier_choice(choice)
    if num_classes != NUM_CLASSES:
        return None
    out = Path(cache_dir) / f"embedded-classifier-{image_size}"
    if not (out / "config.json").is_file():
        from maskgil.classifier import train_embedded_classifier

        print(f"training the embedded classifier into {out} (once; cached)", flush=True)
        _, acc = train_embedded_classifier(out, image_size=image_size, steps=train_steps)
        print(f"embedded classifier: val accuracy {acc:.3f}", flush=True)
    return str(out)


# ------------------------------------------------------------------------------------- collection

class Collector:
    """Consumes scored batches: keeps features/labels/preds/timings, the first images for the grid,
    and streams every image into the .npz writer; checks that each sample arrived exactly once."""

    def __init__(self, num_images: int, image_hw: tuple[int, int], npz: str | None = None, grid_images: int = 64):
        self.num_images = num_images
        self.grid_images = grid_images
        self.parts: dict[str, list] = {"index": [], "label": [], "features": [], "logits": [], "pred": [], "seconds": []}
        self.grid: list[np.ndarray] = []
        self.writer = AdmNpzWriter(npz, num_images, image_hw) if npz else None

    def add(self, batch: dict) -> None:
        for k in self.parts:
            if k in batch:
                self.parts[k].append(np.asarray(batch[k]))
        if "image" in batch:
            images = np.asarray(batch["image"])
            room = self.grid_images - sum(len(g) for g in self.grid)
            if room > 0:
                self.grid.append(images[:room].copy())
            if self.writer is not None:
                self.writer.write(images, batch["label"])

    def finish(self) -> dict:
        out = {k: np.concatenate(v) for k, v in self.parts.items() if v}
        got = np.sort(out["index"])
        if len(got) != self.num_images or not np.array_equal(got, np.arange(self.num_images)):
            if self.writer is not None:
                self.writer.abort()
            missing = sorted(set(range(self.num_images)) - set(got.tolist()))
            raise RuntimeError(f"expected samples 0..{self.num_images - 1} once each, got {len(got)} "
                               f"(missing {missing[:10]}{'...' if len(missing) > 10 else ''})")
        out["grid"] = np.concatenate(self.grid) if self.grid else None
        out["npz"] = str(self.writer.close()) if self.writer is not None else None
        return out

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _workers(cfg: EvalConfig, classifier_dir: str | None, image_hw: tuple[int, int], num_gpus: float = 0):
    sample_kwargs = dict(paths=dataclasses.asdict(cfg.paths), spec=dataclasses.asdict(cfg.spec),
                         num_images=cfg.num_images, num_gpus=num_gpus)
    if cfg.prompts:
        ps = prompt_set(cfg.prompts, image_hw[0])
        sample_kwargs.update(prompts=list(ps.prompts), prompt_labels=None if ps.labels is None else list(ps.labels))
    score_kwargs = dict(inception_weights=cfg.inception_weights, classifier_dir=classifier_dir,
                        keep_images=bool(cfg.npz) or cfg.grid_images > 0, num_gpus=num_gpus)
    return sample_kwargs, score_kwargs


def run_local(cfg: EvalConfig, classifier_dir: str | None, image_hw, batch_size: int = 8,
              progress: bool = True) -> dict:
    """The evaluation's workers in this process, chunk batches in order (no Ray)."""
    sample_kwargs, score_kwargs = _workers(cfg, classifier_dir, image_hw)
    sampler, scorer = SampleAndDecode(**sample_kwargs), ScoreImages(**score_kwargs)
    collector = Collector(cfg.num_images, image_hw, cfg.npz, cfg.grid_images)
    ids = np.arange(num_chunks(cfg.num_images, cfg.spec.seed_chunk))
    try:
        with tqdm(total=cfg.num_images, unit="img", desc=f"evaluate {cfg.spec.label()}", disable=not progress) as bar:
            for start in range(0, len(ids), batch_size):
                batch = scorer(sampler({"id": ids[start:start + batch_size]}))
                collector.add(batch)
                bar.update(len(batch["index"]))
    except BaseException:
        collector.abort()
        raise
    return collector.finish()


def run_ray_data(cfg: EvalConfig, classifier_dir: str | None, image_hw, sample_actors: int = 1,
                 score_actors: int = 1, batch_size: int = 8, score_batch_size: int = 32, num_gpus: float = 0,
                 cpus_per_actor: float = 1, progress: bool = True) -> dict:
    """Generation as a Ray Data job: chunk ids -> SampleAndDecode pool -> ScoreImages pool -> driver.

    Output order is preserved, so the .npz holds samples 0..N-1 in order whatever the pool sizes."""
    import ray

    sample_kwargs, score_kwargs = _workers(cfg, classifier_dir, image_hw, num_gpus)
    ctx = ray.data.DataContext.get_current()
    old_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    n_chunks = num_chunks(cfg.num_images, cfg.spec.seed_chunk)
    # Chunk ids built on the driver (no read task to schedule: with the actor pools holding every CPU a
    # read task would wait forever), one block per sampler batch.
    ds = ray.data.from_items([{"id": i} for i in range(n_chunks)], override_num_blocks=math.ceil(n_chunks / batch_size))
    gpu = {"num_gpus": num_gpus} if num_gpus else {}
    ds = ds.map_batches(SampleAndDecode, fn_constructor_kwargs=sample_kwargs, batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(size=sample_actors), num_cpus=cpus_per_actor, **gpu)
    ds = ds.map_batches(ScoreImages, fn_constructor_kwargs=score_kwargs, batch_size=score_batch_size,
                        compute=ray.data.ActorPoolStrategy(size=score_actors), num_cpus=cpus_per_actor, **gpu)
    collector = Collector(cfg.num_images, image_hw, cfg.npz, cfg.grid_images)
    try:
        with tqdm(total=cfg.num_images, unit="img", desc=f"evaluate {cfg.spec.label()}", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                collector.add(batch)
                bar.update(len(batch["index"]))
    except BaseException:
        collector.abort()
        raise
    finally:
        ctx.execution_options.preserve_order = old_order
    return collector.finish()


# ---------------------------------------------------------------------------------------- scoring

def summarize(collected: dict, reference, cfg: EvalConfig, info: GeneratorInfo, wall_seconds: float,
              feature_network: str) -> dict:
    """All numbers of one evaluation, with the feature network and reference that produced them."""
    from maskgil.classifier import shape_and_colour
    from maskgil.metrics import compute_generation_metrics

    result = compute_generation_metrics(collected["features"], reference, gen_logits=collected.get("logits"),
                                        feature_network=feature_network, k=cfg.k)
    labels = collected["label"]
    known = labels >= 0  # unlabelled prompts have label -1
    if "pred" in collected and known.any():
        pred, labels = collected["pred"][known], labels[known]
        (ps, pc), (ts, tc) = shape_and_colour(pred), shape_and_colour(labels)
        result.update(class_accuracy=float((pred == labels).mean()), colour_accuracy=float((pc == tc).mean()),
                      shape_accuracy=float((ps == ts).mean()))
    n_tokens = info.grid[0] * info.grid[1]
    result.update(
        sampler=cfg.spec.label(n_tokens),
        settings=dataclasses.asdict(cfg.spec),  # everything that produced these numbers, not just the label
        checkpoints={k: v for k, v in dataclasses.asdict(cfg.paths).items() if v},
        num_images=cfg.num_images,
        model_steps=cfg.spec.model_steps(n_tokens),
        seconds_per_image=float(collected["seconds"].mean()),  # sampling + decoding, one worker
        images_per_s=cfg.num_images / wall_seconds,  # end to end: all workers, features included
        wall_seconds=wall_seconds,
    )
    if cfg.prompts:
        result.update(prompts=cfg.prompts, images_per_prompt=cfg.num_images // len(prompt_set(cfg.prompts,
                                                                                             info.image_hw[0])))
    else:
        result["images_per_class"] = cfg.num_images // info.num_classes
    return result


def format_result(r: dict) -> str:
    """Human-readable lines; every metric line names the network and reference it comes from."""
    src = f"[{r['feature_network']} vs {r['reference']}]"
    per = f"{r['images_per_prompt']}/prompt of {r['prompts']}" if "prompts" in r else f"{r['images_per_class']}/class"
    lines = [f"{r['sampler']}: {r['num_generated']} samples ({per}), {r['model_steps']} model steps/image",
             f"  FID {r['fid']:.3f}  {src}"]
    if r.get("fid_note"):
        lines.append(f"  ({r['fid_note']})")
    if "precision" in r:
        lines.append(f"  precision {r['precision']:.3f}  recall {r['recall']:.3f}  (k=3)  {src}")
    if "inception_score" in r:
        lines.append(f"  IS {r['inception_score']:.3f} ± {r['inception_score_std']:.3f}  [{r['feature_network']}]")
    if "class_accuracy" in r:
        lines.append(f"  class accuracy {r['class_accuracy']:.3f} (colour {r['colour_accuracy']:.3f}, "
                     f"shape {r['shape_accuracy']:.3f})  [embedded classifier {r.get('classifier', '')}]")
    lines.append(f"  {r['seconds_per_image']:.4f} s/image sampling+decoding per worker; "
                 f"{r['images_per_s']:.2f} images/s end to end")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ MLflow

def training_run_id(checkpoint_dir: str | None) -> str | None:
    """The MLflow run that trained a checkpoint, if its config.json `extra` names one."""
    if not checkpoint_dir:
        return None
    from maskgil.checkpoint import read_config

    return read_config(checkpoint_dir).get("extra", {}).get("mlflow_run_id")


def log_evaluation(result: dict, cfg: EvalConfig, tracking_uri: str, experiment: str, grid_png: str | None,
                   run_name: str | None = None) -> str:
    """One MLflow run: params (sampler, checkpoints, reference), metrics, tags naming the network and
    reference, the grid PNG and result.json; linked to the checkpoint's training run by tag."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    params = {f"sampler.{k}": v for k, v in dataclasses.asdict(cfg.spec).items()}
    params.update({f"checkpoint.{k}": v for k, v in dataclasses.asdict(cfg.paths).items() if v},
                  num_images=cfg.num_images, reference=cfg.reference, prompts=cfg.prompts or "none",
                  inception_weights=cfg.inception_weights or "fid-helper",
                  classifier=result.get("classifier", "none"))
    tags = {"feature_network": result["feature_network"], "reference": result["reference"],
            "reference_feature_network": result["reference_feature_network"], "sampler_label": result["sampler"]}
    parent = training_run_id(cfg.paths.primary(cfg.spec.sampler))
    if parent:
        tags["parent_training_run"] = parent
    if cfg.spec.sampler == "fusion" and training_run_id(cfg.paths.ar):
        tags["parent_training_run_ar"] = training_run_id(cfg.paths.ar)
    metrics = {k: float(v) for k, v in result.items() if isinstance(v, (int, float, np.floating, np.integer))
               and not isinstance(v, bool)}
    with mlflow.start_run(run_name=run_name or f"eval-{result['sampler']}") as run:
        mlflow.log_params(params)
        mlflow.set_tags(tags)
        mlflow.log_metrics(metrics)
        if grid_png:
            mlflow.log_artifact(grid_png)
        mlflow.log_dict(result, "result.json")
        return run.info.run_id


# ------------------------------------------------------------------------------------- one call

@dataclasses.dataclass
class Prepared:
    info: GeneratorInfo
    reference: object  # maskgil.metrics.Reference
    reference_path: Path  # its cached .npz
    feature_network: str
    classifier_dir: str | None


def check_inputs(cfg: EvalConfig) -> tuple[GeneratorInfo, int]:
    """The checks that need no model, no Inception network and no Ray: checkpoints, ar_tokens against
    the token grid, prompts and the class balance of num_images, the reference, weights and
    classifier paths. Returns the models' facts and the classes the judge can score (0: none)."""
    from maskgil.data.embedded import NUM_CLASSES

    info = generator_info(cfg.paths, cfg.spec.sampler, cfg.spec.grid)
    if cfg.spec.ar_tokens is not None:  # fusion's k: 0..the grid's tokens (a set value is checked for any sampler)
        cfg.spec.fusion_k(info.grid[0] * info.grid[1])
    num_classes = info.num_classes
    if info.cond == "text":
        if not cfg.prompts:
            raise ValueError("the generator is text-conditional: give prompts (e.g. embedded:val, or a prompt file)")
        ps = prompt_set(cfg.prompts, info.image_hw[0])
        check_balanced(cfg.num_images, len(ps), "prompt")
        num_classes = NUM_CLASSES if ps.labels is not None else 0  # labelled embedded prompts: the judge applies
    elif cfg.prompts:
        raise ValueError("prompts are for text-conditional generators; this one is class-conditional")
    else:
        check_balanced(cfg.num_images, info.num_classes)
    if not Path(cfg.reference).exists():
        raise FileNotFoundError(f"reference {cfg.reference} does not exist (a folder of images or an .npz)")
    if cfg.inception_weights and not Path(cfg.inception_weights).is_file():
        raise FileNotFoundError(f"Inception weights file not found: {cfg.inception_weights}")
    check_classifier_choice(cfg.classifier)
    return info, num_classes


def prepare(cfg: EvalConfig, progress: bool = True) -> Prepared:
    """Everything an evaluation needs before sampling: model facts, reference, network, classifier."""
    from maskgil.evaluation.reference import load_reference
    from maskgil.metrics import InceptionFeatureExtractor

    info, num_classes = check_inputs(cfg)
    extractor = InceptionFeatureExtractor(cfg.inception_weights)
    reference, path = load_reference(cfg.reference, info.image_hw, extractor, cfg.cache_dir, limit=cfg.reference_limit,
                                     adm_stats=cfg.adm_stats, progress=progress)
    classifier_dir = resolve_classifier(cfg.classifier, num_classes, info.image_hw[0], cfg.cache_dir)
    return Prepared(info, reference, path, extractor.feature_network, classifier_dir)


def evaluate(cfg: EvalConfig, engine: str = "ray", out_dir: str | os.PathLike | None = None,
             tracking_uri: str | None = "sqlite:///mlflow.db", experiment: str = "evaluate",
             run_name: str | None = None, progress: bool = True, **engine_kwargs) -> dict:
    """Generate, score, write result.json + grid PNG into out_dir, log an MLflow run; returns the result."""
    prep = prepare(cfg, progress)
    info, classifier_dir = prep.info, prep.classifier_dir
    start = time.perf_counter()
    if engine == "ray":
        collected = run_ray_data(cfg, classifier_dir, info.image_hw, progress=progress, **engine_kwargs)
    elif engine == "local":
        collected = run_local(cfg, classifier_dir, info.image_hw, progress=progress, **engine_kwargs)
    else:
        raise ValueError(f"engine must be 'ray' or 'local', got {engine!r}")
    wall = time.perf_counter() - start
    result = summarize(collected, prep.reference, cfg, info, wall, prep.feature_network)
    if classifier_dir:
        result["classifier"] = classifier_dir
    if collected["npz"]:
        result["npz"] = collected["npz"]
    out_dir = Path(out_dir or Path(cfg.cache_dir) / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = cfg.spec.file_stem(info.grid[0] * info.grid[1])
    grid_png = None
    if collected["grid"] is not None and len(collected["grid"]):
        grid_png = str(save_png(image_grid(collected["grid"]), out_dir / f"samples-{stem}.png"))
        result["grid_png"] = grid_png
    if tracking_uri:
        result["mlflow_run_id"] = log_evaluation(result, cfg, tracking_uri, experiment, grid_png, run_name)
    (out_dir / f"result-{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result
