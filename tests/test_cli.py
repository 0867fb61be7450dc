"""Command-line usage errors of the pipelines: a wrong flag, path or value ends the command with exit
status 2 and one argparse-style line naming it, before any Ray cluster, MLflow run or model load
(no traceback). Fast: nothing here starts Ray."""
from __future__ import annotations

from pathlib import Path

import pytest
import ray

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "ray_configs"


def usage_error(main, argv, capsys) -> str:
    """stderr of `main(argv)`, which must stop with exit status 2 and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "error:" in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A random-weight llamagen-vq-tiny checkpoint (downsample 8)."""
    from maskgil.tokenizers import build_tokenizer

    out = tmp_path_factory.mktemp("cli") / "tok"
    build_tokenizer("llamagen-vq-tiny").save_pretrained(out)
    return str(out)


# ------------------------------------------------------------------------------- make_dataset
def test_make_dataset_refuses_a_non_empty_out_unless_overwrite(tmp_path, capsys):
    """A second, smaller set written into the same folder would leave the first one's extra files
    for pretokenize to read: refused; --overwrite replaces the folder instead."""
    from pipelines.make_dataset import main

    out = tmp_path / "pq"
    main(["parquet", "--out", str(out), "--n", "4", "--size", "16", "--num-files", "2"])
    assert len(list(out.glob("*.parquet"))) == 2
    err = usage_error(main, ["parquet", "--out", str(out), "--n", "2", "--size", "16"], capsys)
    assert f"--out {out} is not empty: pass --overwrite" in err
    assert len(list(out.glob("*.parquet"))) == 2  # untouched
    main(["parquet", "--out", str(out), "--n", "2", "--size", "16", "--overwrite"])
    assert [p.name for p in out.glob("*.parquet")] == ["train-00000-of-00001.parquet"]  # no stale file left
    # a bad value is refused before --overwrite removes anything
    usage_error(main, ["parquet", "--out", str(out), "--n", "2", "--size", "16", "--overwrite",
                       "--size-range", "0.5", "0.9"], capsys)
    assert len(list(out.glob("*.parquet"))) == 1


@pytest.mark.parametrize("argv,message", [
    (["--size", "4"], "argument --size: image sides must be >= 8 px, got '4'"),
    (["--size", "64x"], "argument --size: expected a side in px or WIDTHxHEIGHT"),
    (["--size-range", "0.6", "0.5"], "--size-range: size_range must satisfy 0 < lo <= hi <= 0.7"),
    (["--size-range", "nan", "0.5"], "--size-range: size_range must satisfy"),
    (["--max-clutter", "-1"], "--max-clutter: max_clutter must be >= 0"),
    (["--n-train", "-1"], "--n-train must be >= 0"),
    (["--n-train", "0", "--n-val", "0"], "--n-train + --n-val must be >= 1"),
    (["--quality", "0"], "--quality must be in [1, 100]"),
])
def test_make_dataset_range_errors(argv, message, tmp_path, capsys):
    from pipelines.make_dataset import main

    err = usage_error(main, ["imagenet", "--out", str(tmp_path / "out"), *argv], capsys)
    assert message in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["parquet", "--n", "0"], "--n must be >= 1"),
    (["parquet", "--n", "4", "--num-files", "5"], "--num-files must be in [1, --n=4]"),
    (["webdataset", "--n", "4", "--shard-size", "0"], "--shard-size must be >= 1"),
    (["webdataset", "--n", "4", "--aspect-ratios", "1", "-2"], "--aspect-ratios must be finite numbers > 0"),
])
def test_make_dataset_count_errors(argv, message, tmp_path, capsys):
    from pipelines.make_dataset import main

    err = usage_error(main, [argv[0], "--out", str(tmp_path / "out"), *argv[1:]], capsys)
    assert message in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ train
@pytest.mark.parametrize("make_dir", [False, True])
def test_train_with_missing_shards_is_a_usage_error_naming_pretokenize(make_dir, tmp_path, capsys):
    """No manifest at data.shards (nothing there, or an unfinished pretokenize run) used to end in a
    traceback from run_training; now a usage error names the path and the command that writes it."""
    from pipelines.train import main

    shards = tmp_path / "shards"
    if make_dir:
        shards.mkdir()
    err = usage_error(main, ["--config", str(CONFIGS / "train_maskgil_tiny.yaml"), "--shards", str(shards),
                             "--set", f"run.storage_path={tmp_path / 'ray'}"], capsys)
    assert f"no token shards at {shards}: manifest.json not found" in err
    assert "pipelines/pretokenize.py" in err and f"--out {shards}" in err
    assert ("the directory does not exist" in err) != make_dir
    assert not ray.is_initialized() and not (tmp_path / "ray").exists()


# ------------------------------------------------------------------------------- pretokenize
@pytest.mark.parametrize("case", ["missing", "empty", "no-images", "image-size", "bucket-size"])
def test_pretokenize_refuses_bad_sources_and_sizes_before_ray(case, tokenizer_dir, tmp_path, capsys):
    from pipelines.pretokenize import main

    source, extra = tmp_path / "src", []
    if case != "missing":
        (source / ("class0" if case == "no-images" else "")).mkdir(parents=True)
    if case in ("image-size", "bucket-size"):
        from maskgil.data.embedded import write_imagenet_folder

        write_imagenet_folder(tmp_path / "data", n_train=2, n_val=0, size=16)
        source = tmp_path / "data" / "train"
        extra = ["--image-size", "60"] if case == "image-size" else ["--buckets", "64x44", "--target", "caption"]
    err = usage_error(main, ["--source", str(source), "--format", "imagenet", "--out", str(tmp_path / "out"),
                             "--tokenizer", tokenizer_dir, "--no-mlflow", *extra], capsys)
    want = {"missing": f"--source: source '{source}' is not a directory",
            "empty": "has no class folders",
            "no-images": f"--source: {source} holds no images in the imagenet layout",
            "image-size": "--image-size: image size 60x60 is not a multiple of the tokenizer's downsample factor 8",
            "bucket-size": "--buckets: image size 64x44 is not a multiple of the tokenizer's downsample factor 8"}
    assert want[case] in err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["--buckets", "64x48,wide"], "argument --buckets: bad bucket 'wide': expected WIDTHxHEIGHT"),
    (["--buckets", "64x0"], "argument --buckets: bucket sides must be >= 1"),
    (["--num-tokenizers", "0"], "--num-tokenizers must be >= 1, got 0"),
    (["--decode-cpus", "0"], "--decode-cpus must be > 0"),
])
def test_pretokenize_flag_errors(argv, message, capsys):
    from pipelines.pretokenize import parse_args

    err = usage_error(parse_args, ["--source", "s", "--format", "imagenet", "--out", "o", "--tokenizer", "t", *argv],
                      capsys)
    assert message in err


def test_pretokenize_mlflow_run_ends_failed_when_the_run_raises(tokenizer_dir, tmp_path, monkeypatch):
    """The MLflow run used to be ended FINISHED whatever happened; a run that raises is FAILED."""
    import mlflow

    import pipelines.pretokenize as pretokenize
    from maskgil.data.embedded import write_imagenet_folder

    write_imagenet_folder(tmp_path / "data", n_train=2, n_val=0, size=16)

    def broken(cfg):
        raise RuntimeError("decode stage lost")

    monkeypatch.setattr(pretokenize, "init_ray", lambda *a, **k: None)  # no cluster: the stream is stubbed
    monkeypatch.setattr(pretokenize, "run_pretokenize", broken)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="decode stage lost"):
        pretokenize.main(["--source", str(tmp_path / "data" / "train"), "--format", "imagenet",
                          "--out", str(tmp_path / "out"), "--tokenizer", tokenizer_dir, "--image-size", "16",
                          "--tracking-uri", uri, "--experiment", "cli-test"])
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cli-test").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert mlflow.active_run() is None


# --------------------------------------------------------------------------- train_tokenizer
@pytest.mark.parametrize("argv,message", [
    (["--code-noise", "1"], "--code-noise is a probability in [0, 1), got 1.0"),
    (["--code-noise", "-0.1"], "--code-noise is a probability in [0, 1)"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--image-size", "60"], "--image-size 60 is not a multiple of the tokenizer's downsample factor 8"),
    (["--model-overrides", "[1]"], "argument --model-overrides: expected a JSON object"),
    (["--model-overrides", "{codebook_size: 8}"], "argument --model-overrides: not valid JSON"),
])
def test_train_tokenizer_flag_errors(argv, message, capsys):
    from pipelines.train_tokenizer import parse_args

    assert message in usage_error(parse_args, ["--out", "x", *argv], capsys)


# ---------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    from test_evaluate_setup import tiny_setup

    return tiny_setup(tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("argv,message", [
    (["--grid", "0x4"], "argument --grid: a token grid has at least 1x1 tokens"),
    (["--grid", "wide"], "argument --grid: a token grid looks like 16x16"),
    (["--sampler", "fusion", "--ar-tokens", "-1"], "--ar-tokens must be >= 0, got -1"),
    (["--sampler", "fusion", "--ar-tokens", "65"], "ar_tokens must be in [0, 64], got 65"),  # 8x8 grid
    (["--sampler", "fusion", "--grid", "4x4", "--ar-tokens", "17"], "ar_tokens must be in [0, 16], got 17"),
    # --prompts mistakes without --num-images (its default is computed from the prompt set first)
    (["--prompts", "no-such-prompts.txt"], "prompt file no-such-prompts.txt not found"),
    (["--prompts", "embedded:bogus"], "unknown embedded prompt set 'embedded:bogus'"),
    (["--prompts", "embedded:unseen"], "prompts are for text-conditional generators"),
    (["--sample-actors", "0"], "--sample-actors must be >= 1"),
    (["--ar-tokens", "16"], "--sampler mar does not use it"),  # a knob of another sampler, not ignored
    (["--sampler", "ar", "--ar-tokens", "16"], "--sampler ar does not use it"),
    (["--top-p", "0.9"], "--top-p filters the AR draws"),
    (["--cpus-per-actor", "0"], "--cpus-per-actor must be > 0"),
])
def test_evaluate_flag_errors_before_ray(argv, message, eval_setup, tmp_path, capsys):
    from pipelines.evaluate import main

    s = eval_setup
    err = usage_error(main, ["--tokenizer", s["tokenizer"], "--mar", s["mar"], "--ar", s["ar"],
                             "--reference", s["reference"], "--out", str(tmp_path / "out"), *argv], capsys)
    assert message in err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()
