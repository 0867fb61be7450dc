r"""Train an image tokenizer with Ray Train (TorchTrainer; gloo on CPU, NCCL on GPU) and log it to MLflow.

    # tiny LlamaGen-VQ on the embedded procedural set, 2 CPU workers (laptop / CI)
    python pipelines/train_tokenizer.py --preset llamagen-vq-tiny --steps 1500 --out runs/tok_tiny
    # paper-size LlamaGen-VQ on ImageNet, 8 GPU workers
    ray job submit -- python pipelines/train_tokenizer.py --preset llamagen-vq --data /data/imagenet/train \
        --format imagenet --image-size 256 --batch-size 16 --num-workers 8 --use-gpu --steps 400000 \
        --perceptual lpips --lpips-weights vgg.pth --vgg16-weights vgg16.pth --out runs/llamagen_vq

Rerunning with the same --name and --storage-path resumes from the last checkpoint (Ray Train),
and continues the same MLflow run. The final tokenizer lands in --out (config.json + model.safetensors),
with metrics.json (PSNR, SSIM, usage, rFID on held-out images) and recon.png beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskgil.cli import HelpFormatter, check_ranges  # noqa: E402
from maskgil.cluster import check_worker_group_fits, cluster_address, init_ray  # noqa: E402
from maskgil.precision import PRECISIONS  # noqa: E402
from maskgil.tokenizers.presets import TOKENIZER_PRESETS, build_tokenizer, tokenizer_config  # noqa: E402
from maskgil.tokenizers.ray_train import build_dataset, train_loop_per_worker  # noqa: E402
from maskgil.tokenizers.training import TokenizerTrainConfig, default_train_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def absolute_tracking_uri(uri: str) -> str:
    """Workers run in other directories: make `sqlite:///relative.db` absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def held_out_images(args):
    from maskgil.tokenizers.evaluate import load_eval_images

    spec = args.eval_images or (f"embedded:{args.eval_n}:val" if args.data == "embedded" else None)
    if spec is None:
        return None
    return load_eval_images(spec, args.eval_format or args.format, args.image_size, args.eval_n)


def json_object(text: str) -> dict:
    """--model-overrides converter: a JSON object, or a message argparse shows."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of config fields, e.g. '{{\"codebook_size\": 1024}}', "
                                         f"got {text!r}")
    return value


# Numeric flags: the smallest value each takes (None: unset, the preset's default decides), and the
# ones that must be > 0. --code-noise and --ema-decay also have an upper bound (checked in parse_args).
AT_LEAST = {"n_images": 1, "image_size": 1, "steps": 1, "batch_size": 1, "perceptual_weight": 0, "disc_weight": 0,
            "disc_start": 0, "ema_decay": 0, "num_workers": 1, "checkpoint_every": 1, "log_every": 1,
            "grid_every": 1, "eval_n": 1}
ABOVE_ZERO = ("lr", "cpus_per_worker")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="llamagen-vq-tiny", choices=sorted(TOKENIZER_PRESETS), help="tokenizer preset")
    p.add_argument("--model-overrides", type=json_object, default={}, help='JSON of config fields, e.g. \'{"codebook_size": 1024}\'')
    p.add_argument("--data", default="embedded", help="'embedded' or a directory of images")
    p.add_argument("--format", choices=["imagenet", "parquet", "webdataset"], default="imagenet",
                   help="layout of a --data directory")
    p.add_argument("--n-images", type=int, default=4096, help="embedded: number of training images")
    p.add_argument("--image-size", type=int, default=None,
                   help="default 64 for -tiny presets, else 256; a multiple of the tokenizer's downsample factor")
    p.add_argument("--steps", type=int, default=1500, help="training steps")
    p.add_argument("--batch-size", type=int, default=None, help="per worker (default: the preset's recipe)")
    p.add_argument("--shuffle-buffer", type=int, default=1024,
                   help="rows each worker shuffles its stream in (an ImageNet shard is one class); 0 = file order")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's recipe)")
    p.add_argument("--recon-loss", choices=["l1", "l2"], default=None, help="reconstruction loss (default: l2)")
    p.add_argument("--perceptual", choices=["auto", "lpips", "inception", "none"], default=None,
                   help="perceptual loss network; auto: LPIPS if --lpips-weights and --vgg16-weights are given, "
                        "else Inception features")
    p.add_argument("--perceptual-weight", type=float, default=None,
                   help="perceptual loss weight (default: the preset's recipe; 0 = off)")
    p.add_argument("--lpips-weights", default=None, help="LPIPS heads weights file (lpips' vgg.pth)")
    p.add_argument("--vgg16-weights", default=None, help="torchvision VGG16 state dict file for LPIPS")
    p.add_argument("--disc-weight", type=float, default=None, help="GAN loss weight (default: the preset's recipe; 0 = no GAN)")
    p.add_argument("--disc-start", type=int, default=None, help="step at which the GAN loss starts")
    p.add_argument("--disc-adaptive", action="store_true", default=None,
                   help="taming's adaptive GAN weight (gradient-norm balance at the decoder's last layer)")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA of the weights, in [0, 1) (default 0: no EMA)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16 autocast (quantizer in fp32), fp32 (default), or auto: bf16 where the device "
                        "multiplies bf16 natively (GPUs with bf16, CPUs with AMX or AVX512-BF16)")
    p.add_argument("--code-noise", type=float, default=None,
                   help="probability in [0, 1) that a decoder input code is swapped for a random one in training "
                        "(0.1 makes decoded images robust to a generator's wrong tokens; the quickstart uses it)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs reserved per worker")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--name", default=None, help="Ray Train run name (rerun the same name to resume)")
    p.add_argument("--storage-path", default=str(REPO / "ray_results"), help="Ray Train storage (checkpoints)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=50, help="steps between logged metrics")
    p.add_argument("--grid-every", type=int, default=500, help="steps between logged reconstruction grids")
    p.add_argument("--out", required=True, help="final tokenizer directory")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI")
    p.add_argument("--experiment", default="tokenizers", help="MLflow experiment name")
    p.add_argument("--eval-images", default=None, help="held-out images: embedded:N[:split] or a directory")
    p.add_argument("--eval-format", default=None, choices=["imagenet", "parquet", "webdataset"],
                   help="layout of an --eval-images directory (default: --format)")
    p.add_argument("--eval-n", type=int, default=256, help="held-out images to evaluate on")
    p.add_argument("--no-rfid", action="store_true", help="skip rFID in the final evaluation")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights file for rFID")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, set by `ray job submit`, else a private local instance)")
    args = p.parse_args(argv)
    try:  # wrong config fields stop here, not inside a Ray Train worker
        tokenizer_config(args.preset, **args.model_overrides)
    except TypeError as e:
        p.error(f"--model-overrides: {e}")
    if args.shuffle_buffer < 0:
        p.error(f"--shuffle-buffer must be >= 0 (0: file order), got {args.shuffle_buffer}")
    check_ranges(p, args, AT_LEAST, ABOVE_ZERO)
    if args.code_noise is not None and not 0 <= args.code_noise < 1:
        p.error(f"--code-noise is a probability in [0, 1), got {args.code_noise}")
    if args.ema_decay is not None and not args.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1) (0: no EMA), got {args.ema_decay}")
    try:
        with torch.device("meta"):  # no weights: just the downsample factor (and a config that builds)
            down = build_tokenizer(args.preset, **args.model_overrides).downsample
    except (TypeError, ValueError, RuntimeError) as e:
        p.error(f"--model-overrides: {e}")
    size = args.image_size or default_image_size(args.preset)
    if size % down:
        p.error(f"--image-size {size} is not a multiple of the tokenizer's downsample factor {down}")
    try:  # whatever else the train config refuses
        train_config_from_args(args)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    return args


def default_image_size(preset: str) -> int:
    return 64 if preset.endswith("-tiny") else 256


def train_config_from_args(args) -> TokenizerTrainConfig:
    overrides = {k: getattr(args, k) for k in ("batch_size", "lr", "recon_loss", "perceptual", "perceptual_weight",
                                               "lpips_weights", "vgg16_weights", "disc_weight", "disc_start",
                                               "disc_adaptive", "ema_decay", "precision", "code_noise", "seed") if getattr(args, k) is not None}
    return default_train_config(args.preset, model_overrides=args.model_overrides, **overrides)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.image_size = args.image_size or default_image_size(args.preset)
    args.name = args.name or f"tokenizer-{args.preset}"
    train_config = train_config_from_args(args)

    import mlflow
    import numpy as np
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from maskgil.tokenizers.base import load_tokenizer
    from maskgil.tokenizers.evaluate import evaluate_tokenizer, trained_perceptual
    from maskgil.tokenizers.training import save_recon_grid

    if not ray.is_initialized():
        init_ray(cluster_address(args.address))
    check_worker_group_fits({"CPU": args.cpus_per_worker, **({"GPU": 1.0} if args.use_gpu else {})},
                            args.num_workers, "drop --use-gpu to train on CPUs", "--num-workers / --cpus-per-worker")
    tracking_uri = absolute_tracking_uri(args.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(args.experiment)
    run_dir = Path(args.storage_path) / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id_file = run_dir / "mlflow_run_id"  # resume the same MLflow run on rerun
    run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
    run = mlflow.start_run(run_id=run_id, run_name=args.name)
    run_id_file.write_text(run.info.run_id)
    status = "FAILED"
    try:
        if run_id is None:
            mlflow.log_params({**{f"train.{k}": v for k, v in dataclasses.asdict(train_config).items()},
                               "preset": args.preset, "data": args.data, "image_size": args.image_size,
                               "steps": args.steps, "num_workers": args.num_workers, "use_gpu": args.use_gpu,
                               "shuffle_buffer": args.shuffle_buffer})
        else:
            mlflow.set_tag("resumed", "true")
        eval_images = held_out_images(args)
        grid = eval_images[:8] if eval_images is not None else np.zeros((0, args.image_size, args.image_size, 3), np.uint8)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "train": dataclasses.asdict(train_config), "steps": args.steps, "use_gpu": args.use_gpu,
                "shuffle_buffer": args.shuffle_buffer,
                "threads_per_worker": max(1, int(args.cpus_per_worker)), "tracking_uri": tracking_uri,
                "run_id": run.info.run_id, "log_every": args.log_every, "grid_every": args.grid_every,
                "checkpoint_every": args.checkpoint_every, "grid_images": grid.tolist(),
            },
            scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                         resources_per_worker={"CPU": args.cpus_per_worker}),
            run_config=RunConfig(name=args.name, storage_path=os.path.abspath(args.storage_path),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=1)),
            datasets={"train": build_dataset(args.data, args.format, args.image_size, args.n_images, args.seed)},
        )
        t0 = time.time()
        result = trainer.fit()
        mlflow.log_metric("train_wall_s", time.time() - t0)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with result.checkpoint.as_directory() as d:
            for name in ("config.json", "model.safetensors"):
                shutil.copy(Path(d) / name, out / name)
        tok = load_tokenizer(out)
        metrics = {"steps": int(result.metrics.get("step", args.steps))}
        if eval_images is not None:
            metrics.update(evaluate_tokenizer(tok, eval_images, rfid=not args.no_rfid,
                                              inception_weights=args.inception_weights,
                                              perceptual=trained_perceptual(out)))
            save_recon_grid(tok, eval_images[:16], out / "recon.png", max_images=16)
            mlflow.log_artifact(str(out / "recon.png"), "final")
            mlflow.log_metrics({f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        mlflow.log_artifact(str(out / "metrics.json"), "final")
        print(json.dumps({"out": str(out), "mlflow_run_id": run.info.run_id, **metrics}, indent=2))
        status = "FINISHED"
        return metrics
    finally:
        mlflow.end_run(status=status)


if __name__ == "__main__":
    main()
