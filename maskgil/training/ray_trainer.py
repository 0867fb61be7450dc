"""Ray Train wiring: the per-worker loop around `fit`, and the driver that builds the TorchTrainer.

Each worker: builds the preset, wraps it (DDP on CPU/GPU, FSDP2 for L/XL/XXL on GPUs), restores
`ray.train.get_checkpoint()` if Ray restarted it, reads its shard of the token dataset
(`get_dataset_shard`, reshuffled every epoch), runs `fit`, and reports a checkpoint every N steps.
Rank 0 logs to MLflow into one run created by the driver, so a restarted or rerun job keeps
writing to the same run. Ray keeps the last K checkpoints (CheckpointConfig(num_to_keep=K)).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maskgil.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from maskgil.cluster import check_worker_group_fits, cluster_address, init_ray
from maskgil.data.shards import MANIFEST, bucket_batches, bucket_grids, is_bucketed, label_range, token_dataset
from maskgil.models import build_model
from maskgil.precision import resolve_precision
from maskgil.training.distributed import resolve_strategy, unwrap, wrap_model
from maskgil.training.loop import (Hooks, NonFiniteLossError, TrainConfig, batch_plan, build_optimizer, compile_blocks,
                                   fit, grid_at, load_checkpoint, save_checkpoint)
from maskgil.training.runconfig import absolute_tracking_uri, flatten, shard_dirs, worker_resources

# Test-only fault injection: the worker of rank MASKGIL_FAULT_RANK exits hard after step
# MASKGIL_FAULT_STEP, once (the marker file records that it happened).
FAULT_ENV = ("MASKGIL_FAULT_STEP", "MASKGIL_FAULT_RANK", "MASKGIL_FAULT_MARKER")
NONFINITE_TAG = "maskgil.nonfinite"  # set by rank 0 when the loss turns NaN/inf; read by the driver


# ---------------------------------------------------------------------------- data
def read_shard_manifest(shard_dir: str) -> dict:
    from maskgil.data.shards import read_manifest

    return read_manifest(shard_dir)


def _as_batch(b: dict) -> dict:
    tokens = b["tokens"]
    if tokens.dtype == object:  # variable-length list column: stack the per-row arrays
        tokens = np.stack(tokens)
    out = {"tokens": torch.from_numpy(tokens.astype(np.int64))}
    if "label" in b:
        out["label"] = torch.from_numpy(b["label"].astype(np.int64))
    if "caption" in b:
        out["caption"] = [str(c) for c in b["caption"]]
    if "grid" in b:
        out["grid"] = tuple(b["grid"])
    return out


def shard_batches(iterators: dict, micro: int, seed: int, buffer: int, bucketed=frozenset()):
    """`data(grid, epoch)` for `fit` over Ray DataIterators; a new local shuffle seed per epoch.
    Stages whose shards hold aspect-ratio buckets (`bucketed` grids) yield one-grid micro-batches
    that carry their own "grid", in the order the shuffled rows fill them."""

    def data(grid, epoch):
        grid = tuple(grid)
        if grid not in iterators:
            raise ValueError(f"no token shards for grid {grid[0]}x{grid[1]}; data.shards has "
                             f"{[f'{h}x{w}' for h, w in iterators]}")
        it = iterators[grid].iter_batches(batch_size=micro, batch_format="numpy", drop_last=grid not in bucketed,
                                          local_shuffle_buffer_size=buffer or None,
                                          local_shuffle_seed=seed * 100_003 + epoch)
        if grid in bucketed:
            it = bucket_batches(it, micro)
        for b in it:
            yield _as_batch(b)

    return data


def text_batches(data, model, device, prompts: list[str] | None):
    """Wrap `data(grid, epoch)` so batches carry the text features of their captions. When
    `prompts` is an empty list it is filled with the first distinct captions seen (up to 8): the
    prompts of the run's sample grids unless the run config names some (`sample.prompts`)."""
    from maskgil.text import TextEncoder, with_text_features

    encoder = TextEncoder.for_model(model, device=device)

    def with_text(grid, epoch):
        for b in with_text_features(data(grid, epoch), encoder):
            if prompts is not None and len(prompts) < 8:
                prompts.extend(c for c in dict.fromkeys(b["caption"]) if c not in prompts)
                del prompts[8:]
            yield b

    return with_text, encoder


# ---------------------------------------------------------------------------- MLflow from a worker
class MlflowRunLogger:
    """Logs into an existing MLflow run by id (the driver owns the run's lifecycle)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log_metrics(self, metrics: dict, step: int):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=ms)

    def set_tags(self, tags: dict):
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str, artifact_path: str | None = None):
        self.client.log_artifact(self.run_id, path, artifact_path)


def sample_png(model, tokenizer, grid, sample_cfg: dict, path: str, seed: int = 0, text_encoder=None,
               prompts: list[str] | None = None) -> str:
    """Decode a sample grid (`per_class` samples of each class, or of each prompt for a
    text-conditional model) to PNG with the run's tokenizer."""
    from maskgil.images import image_grid, save_png
    from maskgil.training.samples import decode_tokens, sample_tokens

    if model.config.cond == "text":
        conditions = prompts
    else:
        conditions = sample_cfg.get("classes") or list(range(model.config.num_classes))
    was_training = model.training
    model.eval()
    try:
        tokens, _ = sample_tokens(model, conditions, sample_cfg["per_class"], grid, cfg_scale=sample_cfg["cfg_scale"],
                                  steps=sample_cfg["steps"], temperature=sample_cfg["temperature"],
                                  top_k=sample_cfg["top_k"], choice_temperature=sample_cfg["choice_temperature"],
                                  seed=seed, text_encoder=text_encoder)
    finally:
        model.train(was_training)
    images = decode_tokens(tokenizer, tokens, grid)
    save_png(image_grid(images, ncol=sample_cfg["per_class"] * max(1, 8 // sample_cfg["per_class"])), path)
    return path


# ---------------------------------------------------------------------------- the worker
def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(config["train"])
    torch.set_num_threads(int(config["threads_per_worker"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    strategy = resolve_strategy(cfg.strategy, cfg.preset, world, config["use_gpu"])
    cfg.strategy = strategy  # train_step picks autocast (DDP) vs FSDP2 mixed precision from it
    cfg.precision = resolve_precision(cfg.precision, device)  # "auto" -> what this device runs
    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = build_model(cfg.preset, **cfg.model_overrides)
    if cfg.compile:
        compile_blocks(model)
    model = wrap_model(model, strategy, device, cfg.precision)
    optimizer = build_optimizer(model, cfg)
    _, micro, accum = batch_plan(cfg.global_batch, world, cfg.micro_batch)

    start = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = load_checkpoint(d, model, optimizer)
    logger = MlflowRunLogger(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else None
    if logger:  # what `auto` resolved to, and where the workers ran (the last attempt's, on a resume)
        logger.set_tags({"maskgil.strategy": strategy, "maskgil.device": device.type, "maskgil.num_workers": world,
                         "maskgil.precision": cfg.precision})
    if logger and start:
        logger.log_metrics({"resumed_from_step": start["step"]}, step=start["step"])

    tokenizer = None
    if rank == 0 and config.get("tokenizer") and strategy != "fsdp":
        from maskgil.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(config["tokenizer"]).to(device)

    def on_log(step, metrics):
        if logger:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def on_sample(step):
        if logger and tokenizer is not None and (encoder is None or prompts):
            stage = grid_now[0]  # and, for aspect-ratio buckets, each bucket's grid
            for g in [stage] + [b for b in config["bucketed"].get(stage, []) if b != stage]:
                suffix = "" if g == stage else f"_{g[0]}x{g[1]}"
                with tempfile.TemporaryDirectory() as tmp:
                    path = sample_png(unwrap(model), tokenizer, g, config["sample"],
                                      os.path.join(tmp, f"samples_step{step:08d}{suffix}.png"), seed=cfg.seed,
                                      text_encoder=encoder, prompts=prompts)
                    logger.log_artifact(path, "samples")

    def on_checkpoint(step, metrics, state):
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, model, optimizer, state, rank, extra={"train_config": cfg.to_dict(), "step": step,
                                                                          "mlflow_run_id": config["mlflow_run_id"]})
            ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report(_scalars(metrics), checkpoint=ckpt, checkpoint_dir_name=f"step_{step:08d}")

    # The grid of the step just trained, for on_sample (the first one: step `start`'s, not the model's default).
    grid_now = [grid_at(start["step"] if start else 0, cfg, unwrap(model).config.grid_size)]

    def on_step_end(step):
        grid_now[0] = grid_at(step, cfg, unwrap(model).config.grid_size)
        _maybe_inject_fault(step, rank)

    iterators = {tuple(g): ray.train.get_dataset_shard(f"train_{g[0]}x{g[1]}") for g in config["grids"]}
    data = shard_batches(iterators, micro, cfg.seed, config["shuffle_buffer"], frozenset(config["bucketed"]))
    encoder, prompts = None, list(config["sample"].get("prompts") or [])
    if unwrap(model).config.cond == "text":  # captions -> frozen text features, in this worker
        fill = rank == 0 and not prompts  # no sample.prompts: sample the first captions seen
        data, encoder = text_batches(data, unwrap(model), device, prompts if fill else None)
    if start is not None and start["step"] >= cfg.max_steps:
        ray.train.report({"step": start["step"], "already_complete": 1})
        return
    try:
        fit(model, optimizer, cfg, data, micro_batch=micro, accum=accum, start=start, rank=rank, world_size=world,
            device=device, hooks=Hooks(on_log, on_checkpoint, on_sample, on_step_end), progress=rank == 0)
    except NonFiniteLossError as e:  # stop for good (a restart would replay the same step): tell the driver
        if logger:
            logger.client.set_tag(logger.run_id, NONFINITE_TAG, str(e))
        return


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _maybe_inject_fault(step: int, rank: int) -> None:
    at = os.environ.get("MASKGIL_FAULT_STEP")
    if not at or step != int(at) or rank != int(os.environ.get("MASKGIL_FAULT_RANK", "0")):
        return
    marker = Path(os.environ["MASKGIL_FAULT_MARKER"])
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} after step {step}\n")
    os._exit(1)


# ---------------------------------------------------------------------------- the driver
def training_datasets(grids: dict, bucketed: dict, in_memory: bool, preserve_order: bool) -> dict:
    """{"train_HxW": Ray Dataset} per stage grid (every bucket of a bucketed stage). `in_memory`
    materializes each once: each epoch's streaming split then reads blocks from the object store
    instead of re-running the Parquet read and column conversion (~2 s per epoch on 2 cores).
    `preserve_order` keeps the blocks in file order instead of the order the parallel reads finish
    in, which otherwise changes the rows each worker sees from run to run."""
    out = {}
    for (h, w), d in grids.items():
        ds = token_dataset(d, grid=None if (h, w) in bucketed else (h, w))
        ds.context.execution_options.preserve_order = preserve_order
        out[f"train_{h}x{w}"] = ds.materialize() if in_memory else ds
    return out


def ingest_config(preserve_order: bool):
    """Ray Train's data config: the default ingest options, plus `preserve_order` for the split
    across workers (Ray then ignores locality hints and hands blocks out in order), so the same
    seed, shards and worker count give the same model, bit for bit."""
    from ray.train import DataConfig

    opts = DataConfig.default_ingest_options()
    opts.preserve_order = preserve_order
    return DataConfig(execution_options=opts)


def _shard_manifests(grids: dict) -> dict:
    """{grid: manifest} of every stage's shard directory; a missing one names the directory and the
    command that writes it."""
    out = {}
    for g, d in grids.items():
        try:
            out[g] = read_shard_manifest(d)
        except FileNotFoundError:
            missing = "" if "://" in d or Path(d).is_dir() else " (the directory does not exist)"
            raise FileNotFoundError(
                f"data.shards: no token shards at {d}: {MANIFEST} not found{missing}. Write them with "
                f"`python pipelines/pretokenize.py --source IMAGES --format imagenet|parquet|webdataset "
                f"--tokenizer TOKENIZER --out {d}` (a stopped pretokenize run: rerun its command to finish)") from None
    return out


def check_run(cfg: dict) -> tuple[dict, dict, int | None]:
    """The checks of a run config that need no Ray, no MLflow and no model weights: the token shards
    exist (a finished manifest per stage), their codebook fits the model's vocabulary, their target
    fits its conditioning, and their class labels fit its class table. Raises FileNotFoundError or
    ValueError naming the fix (pipelines/train.py turns them into usage errors before Ray starts).

    Returns (grids, bucketed, codebook): {grid: shard dir}, {grid: bucket grids} for the stages whose
    shards hold aspect-ratio buckets, and the shards' codebook size (None when the manifest omits it)."""
    train = TrainConfig.from_dict(cfg["train"])
    model_cfg = build_model(train.preset, device="meta", **train.model_overrides).config
    grids = shard_dirs(cfg, tuple(model_cfg.grid_size))
    manifests = _shard_manifests(grids)
    # stages whose shards hold aspect-ratio buckets (they train on every bucket) -> the buckets' grids
    bucketed = {g: bucket_grids(d) for g, d in grids.items() if is_bucketed(d)}
    codebook = next(iter(manifests.values())).get("codebook_size")
    vocab = model_cfg.vocab_size
    want = "caption" if getattr(model_cfg, "cond", "class") == "text" else "label"
    for manifest in manifests.values():
        if manifest.get("codebook_size") and manifest["codebook_size"] != vocab:
            raise ValueError(f"token shards use a {manifest['codebook_size']}-code tokenizer but the model's "
                             f"vocab_size is {vocab}: set train.model_overrides.vocab_size={manifest['codebook_size']}")
        if manifest.get("target", want) != want:
            raise ValueError(f"the model is {'text' if want == 'caption' else 'class'}-conditional but the token "
                             f"shards hold {manifest['target']}s: pretokenize with --target {want}, or set "
                             f"train.model_overrides.cond={'class' if want == 'caption' else 'text'}")

    if want == "label":  # a label the class table has no row for fails inside a worker as an IndexError
        n_classes = model_cfg.num_classes
        for d in grids.values():
            span = label_range(d)
            if span and span[0] < 0:
                raise ValueError(f"{d}: the token shards hold class label {span[0]}: labels must be >= 0 (shards "
                                 "written before pretokenize quarantined unlabelled images); rerun pretokenize")
            if span and span[1] >= n_classes:
                raise ValueError(f"{d}: the token shards hold class labels up to {span[1]} but the model has "
                                 f"num_classes={n_classes}: set train.model_overrides.num_classes={span[1] + 1} "
                                 "(or more)")
    check_resume_settings(cfg, grids)
    return grids, bucketed, codebook


RUN_SETTINGS_NAME = "run_settings.json"
# Train keys a rerun may change and still continue the same run (train longer, checkpoint or log
# differently); any other change is a different run, or at least one its records must show.
RESUMABLE_CHANGES = ("max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "compile")


def run_settings(cfg: dict, grids: dict) -> dict:
    """What makes a training run the same run: its TrainConfig and its token shard directories."""
    return {"train": json.loads(json.dumps(TrainConfig.from_dict(cfg["train"]).to_dict())),
            "shards": {f"{h}x{w}": str(d) for (h, w), d in grids.items()}}


def _run_dir(cfg: dict) -> Path:
    return Path(cfg["run"]["storage_path"]).resolve() / (cfg["run"]["name"] or cfg["train"]["preset"])


def check_resume_settings(cfg: dict, grids: dict) -> list[str]:
    """A rerun with the same run.name and storage_path continues that run from its checkpoint. If
    the run was started with another model or other shards that would mix two runs in one set of
    weights and one MLflow record: refused, naming the differences and the fix. Other training
    settings that changed (say the learning rate) are returned as "key: old -> new"; a longer
    max_steps and the checkpoint/log cadence are normal for a resume and not reported."""
    saved_file = _run_dir(cfg) / RUN_SETTINGS_NAME
    if not saved_file.is_file():
        return []
    saved, now = json.loads(saved_file.read_text()), run_settings(cfg, grids)
    diffs = {k: (saved["train"].get(k), v) for k, v in now["train"].items()
             if k not in RESUMABLE_CHANGES and saved["train"].get(k) != v}
    if saved["shards"] != now["shards"]:
        diffs["data.shards"] = (saved["shards"], now["shards"])
    said = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in diffs.items()]
    model_keys = {"preset", "model_overrides", "data.shards"} & set(diffs)
    if model_keys:
        raise ValueError(f"{_run_dir(cfg)} holds a run started with another model or other shards "
                         f"({'; '.join(s for s in said if s.split(':')[0] in model_keys)}); continuing it would mix "
                         f"the two. Give this run its own name (--name / run.name), or delete that directory to "
                         f"start over")
    return said


def run_training(cfg: dict, verbose: int = 1, checked: tuple | None = None) -> dict:
    """Run one training job described by a run config (see maskgil/training/runconfig.py).

    Returns {"checkpoint": final plain checkpoint dir, "run_id", "step", "wall_s", ...}. Rerunning
    with the same run.name and run.storage_path resumes from its last checkpoint. `checked`: what
    `check_run(cfg)` returned, when the caller already ran it (it then is not repeated)."""
    t0 = time.time()
    grids, bucketed, codebook = checked if checked is not None else check_run(cfg)
    import mlflow
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = TrainConfig.from_dict(cfg["train"])
    run, scaling = cfg["run"], cfg["scaling"]
    name = run["name"] or train.preset
    storage = Path(run["storage_path"]).resolve()
    output = Path(run["output"] or storage / name / "final").resolve()
    tracking_uri = absolute_tracking_uri(run["tracking_uri"])

    if not ray.is_initialized():
        init_ray(cluster_address(), env={k: os.environ[k] for k in FAULT_ENV if k in os.environ},
                 log_to_driver=verbose > 0)
    use_gpu = bool(scaling["use_gpu"])
    resources = worker_resources(scaling)
    check_worker_group_fits(resources, int(scaling["num_workers"]),
                            "set scaling.use_gpu=false to train on CPUs",
                            "scaling.num_workers / cpus_per_worker / gpus_per_worker")

    # One MLflow run per (storage, name): a rerun or a restarted job keeps logging into it.
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.set_experiment(run["experiment"])
    run_id_file = storage / name / "mlflow_run_id"
    client = mlflow.tracking.MlflowClient(tracking_uri)
    if run_id_file.is_file():
        run_id = run_id_file.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        if NONFINITE_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, NONFINITE_TAG)
        changed = check_resume_settings(cfg, grids)
        if changed:  # the run's params are its first settings (MLflow params cannot change)
            print(f"warning: continuing the run in {storage / name} with changed settings: {'; '.join(changed)} "
                  "(tagged maskgil.resumed_with_changes in its MLflow run)", flush=True)
            previous = client.get_run(run_id).data.tags.get("maskgil.resumed_with_changes")
            client.set_tag(run_id, "maskgil.resumed_with_changes", "; ".join(filter(None, [previous, *changed]))[:5000])
    else:
        mrun = client.create_run(experiment.experiment_id, run_name=name,
                                 tags={"maskgil.kind": "train", "maskgil.preset": train.preset, **(run["tags"] or {})})
        run_id = mrun.info.run_id
        params = flatten({k: v for k, v in cfg.items() if k != "train"})
        params.pop("run.tags", None)
        params.update({f"train.{k}": v for k, v in train.to_dict().items()})
        params["data.codebook_size"] = codebook
        for h, w in bucketed:  # the image sizes (w, h) of a stage's aspect-ratio buckets
            params[f"data.buckets.{h}x{w}"] = read_shard_manifest(grids[(h, w)]).get("buckets")
        for k, v in list(params.items()):
            client.log_param(run_id, k, str(v)[:5000])
        run_id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(run_id)
    (storage / name / RUN_SETTINGS_NAME).write_text(json.dumps(run_settings(cfg, grids), indent=2) + "\n")

    loop_config = {
        "train": train.to_dict(), "threads_per_worker": scaling["threads_per_worker"], "use_gpu": use_gpu,
        "tracking_uri": tracking_uri, "mlflow_run_id": run_id, "grids": list(grids),
        "bucketed": bucketed,
        "shuffle_buffer": cfg["data"]["shuffle_buffer"], "sample": cfg["sample"],
        "tokenizer": str(Path(run["tokenizer"]).resolve()) if run["tokenizer"] else None,
    }
    ordered = bool(cfg["data"]["preserve_order"])  # the read and the split both keep file order
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=int(scaling["num_workers"]), use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=int(run["max_failures"]))),
        datasets=training_datasets(grids, bucketed, in_memory=bool(cfg["data"]["in_memory"]),
                                   preserve_order=ordered),
        dataset_config=ingest_config(ordered),
    )
    status = "FAILED"
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
        metrics = result.metrics or {}
        stopped = client.get_run(run_id).data.tags.get(NONFINITE_TAG)
        if stopped:
            last = result.checkpoint.path if result.checkpoint else "none (no checkpoint was reached)"
            raise NonFiniteLossError(f"training stopped: {stopped}. The last good checkpoint is kept at {last}; "
                                     "lower the learning rate or check the data, then rerun to resume from it")
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        with result.checkpoint.as_directory() as d:
            output.mkdir(parents=True, exist_ok=True)
            for fname in (CONFIG_NAME, WEIGHTS_NAME):
                shutil.copy2(Path(d) / fname, output / fname)
            step = json.loads((Path(d) / CONFIG_NAME).read_text())["extra"].get("step")
        client.log_artifacts(run_id, str(output), "checkpoint")
        wall = time.time() - t0
        client.log_metric(run_id, "wall_s", wall)
        status = "FINISHED"
        return {"checkpoint": str(output), "run_id": run_id, "step": step, "wall_s": wall,
                "ray_checkpoint": result.checkpoint.path, "metrics": metrics}
    finally:
        client.set_terminated(run_id, status=status)
