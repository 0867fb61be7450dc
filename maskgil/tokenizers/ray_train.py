"""Ray Train wiring for tokenizer training: the per-worker loop and the training Dataset.

Lives in the library (not in pipelines/) so Ray workers import it by name. Data parallel: each
worker reads its Dataset shard; `TokenizerTrainer` averages gradients over the gloo/NCCL group.
Rank 0 logs metrics and reconstruction grids to MLflow and writes the checkpoints
(`TokenizerTrainer.save`: tokenizer + train_state.pt), which Ray Train keeps and restores on resume.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from maskgil.tokenizers.training import TokenizerTrainConfig


def train_loop_per_worker(cfg: dict) -> None:
    """Runs on every Ray Train worker: resume if a checkpoint exists, train, report, checkpoint."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    from mlflow.tracking import MlflowClient

    from maskgil.checkpoint import config_from_dict
    from maskgil.tokenizers.training import TokenizerTrainer, save_recon_grid

    torch.set_num_threads(cfg["threads_per_worker"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device() if cfg["use_gpu"] else torch.device("cpu")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer = TokenizerTrainer.resume(d, device=device)
    else:
        trainer = TokenizerTrainer(config_from_dict(TokenizerTrainConfig, cfg["train"]), device=device)
    config, steps = trainer.config, cfg["steps"]
    client = MlflowClient(cfg["tracking_uri"]) if rank == 0 else None
    if client is not None:
        client.set_tag(cfg["run_id"], "perceptual_loss", trainer.perceptual_name)
        client.set_tag(cfg["run_id"], "precision", trainer.precision)
        if checkpoint is not None:
            client.log_metric(cfg["run_id"], "resumed_from_step", trainer.step, step=trainer.step)
    grid_images = np.asarray(cfg["grid_images"], dtype=np.uint8)

    def batches():
        # A local shuffle buffer mixes the shards (an ImageNet shard holds one class), other rows each epoch.
        shard = ray.train.get_dataset_shard("train")
        while True:
            for b in shard.iter_batches(batch_size=config.batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=cfg.get("shuffle_buffer") or None,
                                        local_shuffle_seed=(config.seed * 100_003 + trainer.step) * 101 + rank):
                yield b["image"]

    def checkpoint_and_report(metrics: dict, final: bool = False) -> None:
        trainer.consolidate_code_counts()  # every rank: rank 0 saves the usage counts of all
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                trainer.save(tmp, extra={"preset": config.preset})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "final": final}, checkpoint=ckpt)

    start, first, it = time.time(), trainer.step, batches()  # first: the step this attempt resumed from
    last = {}
    while trainer.step < steps:
        last = trainer.train_step(next(it))
        step = trainer.step
        if step % cfg["log_every"] == 0 and client is not None:
            last["usage_window"] = trainer.model.codebook_usage()
            last["images_per_s"] = (step - first) * config.batch_size * ctx.get_world_size() / (time.time() - start)
            for k, v in last.items():
                if k != "step":
                    client.log_metric(cfg["run_id"], k, float(v), step=step)
        if step % cfg["grid_every"] == 0 and client is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_recon_grid(trainer.model, grid_images, Path(tmp) / f"recon_step{step:07d}.png")
                client.log_artifact(cfg["run_id"], str(path), "recon")
            trainer.model.train()
        if step % cfg["checkpoint_every"] == 0 and step < steps:
            checkpoint_and_report(last)
    checkpoint_and_report(last, final=True)


def build_dataset(data: str, fmt: str, image_size: int, n_images: int = 4096, seed: int = 0):
    """Ray Dataset with an `image` column (uint8 (S, S, 3)): procedural images when `data` is
    "embedded" (materialised: small), else the decoded, centre-cropped images of a directory."""
    import numpy as np
    import ray.data

    from maskgil.tokenizers.data import embedded_batch, shard_images, shard_to_row

    if data == "embedded":
        ds = ray.data.range(n_images).map_batches(embedded_batch, fn_kwargs={"image_size": image_size, "seed": seed},
                                                  batch_size=256)
        return ds.materialize()
    from maskgil.data.sources import plan_shards

    shards = plan_shards(data, fmt, rows_per_shard=256)  # in file order: an ImageNet shard is one class
    order = np.random.default_rng(seed).permutation(len(shards))  # classes interleaved along the blocks
    return ray.data.from_items([shard_to_row(shards[i]) for i in order]).flat_map(shard_images,
                                                                                  fn_kwargs={"image_size": image_size})
