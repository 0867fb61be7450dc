"""Ray Train pipeline: run configs and the KubeRay manifest parse and hold the paper's settings;
on a local Ray head, a worker killed mid-run is restarted by FailureConfig and training continues
from the last checkpoint to the uninterrupted run's weights, bit for bit; rerunning the same
command resumes.

The head runs as `ray start --head --block` in a child process with its own temp dir and ports
(6710 / 8710 / 107xx) and is stopped by terminating that child, never with `ray stop`.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from maskgil.training import cpu_compile_available
from maskgil.training.runconfig import load_run_config, parse_overrides
from ray_head import local_head, repo_env

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "ray_configs"
GCS_PORT, DASHBOARD_PORT = 6710, 8710


# ------------------------------------------------------------------------------ configs (fast)
@pytest.mark.parametrize("size,strategy,workers", [("b", "ddp", 8), ("l", "fsdp", 8), ("xl", "fsdp", 16),
                                                   ("xxl", "fsdp", 32)])
def test_paper_configs(size, strategy, workers):
    cfg = load_run_config(CONFIGS / f"train_maskgil_{size}.yaml")
    t = cfg["train"]
    assert t["preset"] == f"maskgil-{size}"
    assert (t["lr"], tuple(t["betas"]), t["weight_decay"], t["global_batch"]) == (1e-4, (0.9, 0.96), 1e-5, 256)
    assert t["label_smoothing"] == 0.1 and t["mask_schedule"] == "cosine"
    assert t["model_overrides"] == {"vocab_size": 16384, "num_classes": 1000}
    assert (t["strategy"], t["precision"], cfg["scaling"]["num_workers"]) == (strategy, "bf16", workers)
    assert cfg["scaling"]["use_gpu"] is True
    assert 256 // workers % t["micro_batch"] == 0  # the batch plan divides


def test_text_to_image_config():
    """The paper's text-to-image setting: XL, Chameleon-VQ's 8,192 codes, a projected text prefix,
    256 then 512 px, the class-conditional recipe otherwise."""
    from maskgil.models import build_model
    from maskgil.training.runconfig import shard_dirs

    cfg = load_run_config(CONFIGS / "train_maskgil_t2i_xl.yaml")
    t = cfg["train"]
    assert (t["lr"], tuple(t["betas"]), t["weight_decay"], t["global_batch"]) == (1e-4, (0.9, 0.96), 1e-5, 256)
    model = build_model(t["preset"], device="meta", **t["model_overrides"])
    c = model.config
    assert (c.cond, c.vocab_size, c.text_dim, c.text_len, c.text_encoder) == ("text", 8192, 384, 64, "all-minilm-l6-v2")
    assert 750e6 < sum(p.numel() for p in model.parameters()) < 760e6
    assert [tuple(g[1:]) for g in t["grid_schedule"]] == [(16, 16), (32, 32)]
    assert set(shard_dirs(cfg, c.grid_size)) == {(16, 16), (32, 32)} and len(cfg["sample"]["prompts"]) == 4


def test_tiny_configs_and_overrides():
    mar = load_run_config(CONFIGS / "train_maskgil_tiny.yaml")
    ar = load_run_config(CONFIGS / "train_llamagen_tiny.yaml")
    assert mar["train"]["preset"] == "maskgil-tiny" and ar["train"]["preset"] == "llamagen-tiny"
    assert mar["scaling"]["cpus_per_worker"] * mar["scaling"]["num_workers"] <= 1.0  # leaves a CPU for Ray Data
    cfg = load_run_config(CONFIGS / "train_maskgil_tiny.yaml",
                          parse_overrides(["train.max_steps=7", "scaling.num_workers=1", "train.betas=[0.8, 0.9]"]))
    assert cfg["train"]["max_steps"] == 7 and cfg["scaling"]["num_workers"] == 1 and cfg["train"]["betas"] == [0.8, 0.9]
    with pytest.raises(ValueError, match="unknown key scaling.workers"):
        load_run_config(None, {"scaling": {"workers": 2}})
    with pytest.raises(ValueError, match="unknown training config key"):
        load_run_config(None, {"train": {"learning_rate": 1}})
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["max_steps=3"])
    # One model field from the command line (the form the pre-run checks suggest) keeps the file's
    # others: replacing the whole dict had trained a 256-wide model instead of the file's 128.
    for item in ("train.model_overrides.vocab_size=256", "train.model_overrides={vocab_size: 256}"):
        cfg = load_run_config(CONFIGS / "train_maskgil_tiny.yaml", parse_overrides([item]))
        assert cfg["train"]["model_overrides"] == {"dim": 128, "multiple_of": 32, "vocab_size": 256}, item
    # The text-conditional pair differs from the class pair only by the text prefix, which Serve's
    # fusion needs to be the same in both models.
    text = {k: load_run_config(CONFIGS / f"train_{k}_t2i_tiny.yaml")["train"] for k in ("maskgil", "llamagen")}
    for k, base in (("maskgil", mar), ("llamagen", ar)):
        extra = {f: v for f, v in text[k]["model_overrides"].items() if f not in base["train"].get("model_overrides", {})}
        assert extra == {"cond": "text", "text_dim": 384, "text_len": 24, "text_encoder": "all-minilm-l6-v2"}
        assert {f: v for f, v in text[k].items() if f != "model_overrides"} == \
            {f: v for f, v in base["train"].items() if f != "model_overrides"}


def test_a_rerun_with_another_model_or_shards_is_refused_not_resumed(tmp_path):
    """Same run.name and storage_path continue the run there. Another preset, other model fields or
    other shards would mix two runs in one set of weights: refused, naming the difference. A longer
    run is a resume; a changed learning rate is reported (and tagged in MLflow by run_training)."""
    from maskgil.training.ray_trainer import RUN_SETTINGS_NAME, check_resume_settings, run_settings

    def config(**train):
        return load_run_config(CONFIGS / "train_maskgil_tiny.yaml",
                               {"run": {"storage_path": str(tmp_path), "name": "r"}, "train": train})

    grids = {(8, 8): "/shards/a"}
    assert check_resume_settings(config(), grids) == []  # nothing started there yet
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / RUN_SETTINGS_NAME).write_text(json.dumps(run_settings(config(), grids)))
    assert check_resume_settings(config(), grids) == []
    assert check_resume_settings(config(max_steps=5000, log_every=5, checkpoint_every=50), grids) == []
    assert check_resume_settings(config(lr=5e-4), grids) == ["lr: 0.001 -> 0.0005"]
    for train, named in (({"preset": "llamagen-tiny"}, "preset: 'maskgil-tiny' -> 'llamagen-tiny'"),
                         ({"model_overrides": {"qk_norm": "none"}}, "model_overrides:")):
        with pytest.raises(ValueError, match=f"another model or other shards \\({named}.*own name"):
            check_resume_settings(config(**train), grids)
    with pytest.raises(ValueError, match="data.shards: .*'/shards/a'.*'/shards/b'"):
        check_resume_settings(config(), {(8, 8): "/shards/b"})


def test_override_values_are_typed_like_the_config():
    """YAML 1.1 reads `1e-4` as a string, so `--set train.lr=1e-4` used to reach AdamW as '1e-4' and
    fail inside a Ray worker; values are now checked and coerced when the run config is read."""
    from maskgil.training import TrainConfig

    cfg = load_run_config(CONFIGS / "train_maskgil_tiny.yaml", parse_overrides(
        ["train.lr=1e-4", "train.weight_decay=0", "train.max_steps=1e3", "train.betas=[0.8, 0.9]",
         "scaling.cpus_per_worker=1", "train.model_overrides={dim: 64, grid_size: [4, 4]}"]))
    t = TrainConfig.from_dict(cfg["train"])
    assert t.lr == 0.0001 and isinstance(t.lr, float) and t.weight_decay == 0.0 and isinstance(t.weight_decay, float)
    assert t.max_steps == 1000 and isinstance(t.max_steps, int) and t.betas == (0.8, 0.9)
    assert cfg["scaling"]["cpus_per_worker"] == 1.0 and isinstance(cfg["scaling"]["cpus_per_worker"], float)
    bad = {"train.lr=abc": "train.lr must be a number, got 'abc'",
           "train.max_steps=2.5": "train.max_steps must be an integer, got 2.5",
           "train.compile=maybe": "train.compile must be true or false",
           "train.betas=[0.9]": "train.betas must be a list of 2",
           "train.label_smoothing=none": "train.label_smoothing must be a number or null",
           "scaling.num_workers=two": "scaling.num_workers must be an integer",
           "data.shuffle_buffer=[1]": "data.shuffle_buffer must be an integer",
           "sample.top_k=0.5": "sample.top_k must be an integer or null",
           "train.preset=maskgil-m": "train.preset: unknown preset 'maskgil-m'",
           "train.model_overrides={dim: wide}": "train.model_overrides: LlamaConfig.dim must be an integer",
           "train.model_overrides={width: 8}": "train.model_overrides: unknown LlamaConfig field"}
    for item, message in bad.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
            load_run_config(CONFIGS / "train_maskgil_tiny.yaml", parse_overrides([item]))


@pytest.mark.parametrize("argv,message", [
    (["--config", "no/such/run.yaml"], "No such file or directory"),
    (["--config", str(CONFIGS / "train_maskgil_tiny.yaml"), "--set", "train.lr=fast"], "train.lr must be a number"),
    (["--set", "max_steps=3"], "must look like section.key=value"),
])
def test_train_pipeline_reports_config_mistakes_as_usage_errors(argv, message, capsys):
    """A bad run file or override ends the command with exit status 2 and one line naming the key,
    before Ray starts (no traceback from inside a worker)."""
    from pipelines.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_kuberay_train_manifest():
    job = yaml.safe_load((CONFIGS / "kuberay_train.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["python", "/home/ray/maskgil/pipelines/train.py"]
    config = entry[entry.index("--config") + 1].replace("/home/ray/maskgil/", "")
    assert (ROOT / config).is_file()
    workers = int(next(a.split("=")[1] for a in entry if a.startswith("scaling.num_workers=")))
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert workers == gpus == 16  # one Train worker per GPU over 2 nodes
    mounts = [m["mountPath"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]
              for m in g["template"]["spec"]["containers"][0]["volumeMounts"]]
    storage = entry[[i for i, a in enumerate(entry) if a.startswith("run.storage_path=")][0]].split("=")[1]
    assert any(storage.startswith(m) for m in mounts)  # checkpoints on the shared volume


# ------------------------------------------------------------------------------ local Ray cluster
@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with local_head(tmp_path_factory.mktemp("head"), "mgt", GCS_PORT, DASHBOARD_PORT, 10700, (10720, 10799), env=repo_env()):
        yield f"127.0.0.1:{GCS_PORT}"


def write_token_shards(out: Path, n=64, vocab=32, classes=4, grid=(8, 8), target="label", buckets=None, files=1,
                       first_label=0):
    """A finished shard directory in the pretokenize format (TokenShardWriter + manifest); caption
    shards (`target="caption"`) carry one of `classes` captions per row instead of a label. With
    `buckets` ({grid: rows}) the rows have those grids, as aspect-ratio buckets give them. The rows
    are split over `files` shard files; labels run from `first_label`."""
    from maskgil.data.shards import TokenShardWriter

    rng = np.random.default_rng(0)
    grids = [g for g, k in buckets.items() for _ in range(k)] if buckets else [grid] * n
    n = len(grids)
    labels = np.arange(n) % classes + first_label
    tokens = [rng.integers(0, vocab, h * w) for h, w in grids]
    w = TokenShardWriter(str(out), vocab, None if buckets else grid[0] * grid[1], target)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    cond = labels.tolist() if target == "label" else [f"a {colours[c % 6]} shape number {c}" for c in labels]
    rows = {"tokens": tokens, "grid_h": [g[0] for g in grids], "grid_w": [g[1] for g in grids], target: cond,
            "source": [f"img{i}" for i in range(n)], "aug": [0] * n}
    bounds = np.linspace(0, n, files + 1).astype(int)
    for i in range(files):
        part = {k: v[bounds[i]:bounds[i + 1]] for k, v in rows.items()}
        w.write(i, "test", part, [], int(bounds[i + 1] - bounds[i]))
    sizes = [[8 * gw, 8 * gh] for gh, gw in buckets] if buckets else None
    w.finalize(files, {"grid": None if buckets else list(grid), "buckets": sizes, "image_size": 64,
                   "tokenizer": {"name": "test", "downsample": 8}})


def metric_history(db: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(f"sqlite:///{db}").get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.timestamp, m.step))]


@pytest.mark.cluster
@pytest.mark.slow
def test_worker_killed_mid_run_resumes_to_the_uninterrupted_model_bit_for_bit(head, tmp_path):
    """One command run twice (own run names) on shards spread over many files, 2 workers with a
    shuffle buffer: once straight through, once with rank 1 killed after step 5. FailureConfig
    restarts the group, training resumes from the last checkpoint, and the weights come out identical
    to the uninterrupted run's: no step lost or repeated, the same rows in the same order, and the
    same dropout (seeded by step and rank, so no generator state is restored). That
    needs data.preserve_order (the default): the Parquet reads may finish in any order but the rows
    reach the workers in file order (without it the quickstart's MaskGIL differed by 0.009 after 20
    steps, docs/quickstart_runs.md). Rerunning the finished command resumes and retrains nothing."""
    from safetensors.torch import load_file

    shards = tmp_path / "shards"
    write_token_shards(shards, n=256, files=16)
    db = tmp_path / "mlflow.db"

    def cmd(name):
        return [sys.executable, str(ROOT / "pipelines/train.py"), "--config", str(CONFIGS / "train_maskgil_tiny.yaml"),
                "--shards", str(shards), "--output", str(tmp_path / f"final_{name}"), "--name", name,
                "--tracking-uri", f"sqlite:///{db}",
                "--set", "train.max_steps=8", "train.global_batch=16", "train.checkpoint_every=2", "train.log_every=1",
                "train.warmup_steps=0", "train.model_overrides={n_layers: 1, dim: 32, n_heads: 2, vocab_size: 32, "
                "num_classes: 4, dropout: 0.2}", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "run.max_failures=1",
                f"run.storage_path={tmp_path / 'ray'}", "data.shuffle_buffer=64"]

    def run(name, **env):
        r = subprocess.run(cmd(name), env=dict(repo_env(), RAY_ADDRESS=head, **env), capture_output=True, text=True,
                           timeout=420, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        return json.loads(r.stdout[r.stdout.index("{"):r.stdout.index("}") + 1])

    steady = run("steady")
    marker = tmp_path / "killed"
    fault = dict(MASKGIL_FAULT_STEP="5", MASKGIL_FAULT_RANK="1", MASKGIL_FAULT_MARKER=str(marker))
    out = run("killtest", **fault)
    assert marker.read_text().startswith("killed rank 1 after step 5")
    assert out["step"] == steady["step"] == 8
    run_id = out["run_id"]
    # the final checkpoint names its training run, so evaluations can link to it
    from maskgil.checkpoint import read_config
    assert read_config(out["checkpoint"])["extra"]["mlflow_run_id"] == run_id
    # Steps 1-5 ran, then the kill. The restarted workers load the last checkpoint Ray had registered
    # (step 4, or step 2 when the controller had not yet collected step 4's report when the worker
    # died) and run exactly the steps after it.
    resumed = metric_history(db, run_id, "resumed_from_step")
    assert len(resumed) == 1 and resumed[0][0] in (2, 4)
    r = resumed[0][0]
    assert [s for s, _ in metric_history(db, run_id, "loss")] == [1, 2, 3, 4, 5] + list(range(r + 1, 9))
    # Ray kept the last 2 checkpoints; the final plain checkpoint is step 8's weights ...
    kept = sorted(p.name for p in (tmp_path / "ray" / "killtest").glob("step_*"))
    assert kept == ["step_00000006", "step_00000008"]
    a = load_file(str(tmp_path / "final_killtest" / "model.safetensors"))
    b = load_file(str(tmp_path / "ray" / "killtest" / "step_00000008" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and the uninterrupted run's, bit for bit.
    c = load_file(str(tmp_path / "final_steady" / "model.safetensors"))
    assert a.keys() == c.keys()
    assert all(torch.equal(a[k], c[k]) for k in a), max(float((a[k] - c[k]).abs().max()) for k in a)

    # Rerunning the same command resumes: nothing is retrained, the run and the step count stay.
    again = run("killtest", **dict(fault, MASKGIL_FAULT_STEP=""))
    assert again["run_id"] == run_id and again["step"] == 8
    assert [s for s, _ in metric_history(db, run_id, "loss")] == [1, 2, 3, 4, 5] + list(range(r + 1, 9))


@pytest.mark.cluster
@pytest.mark.slow
def test_a_diverging_run_stops_for_good_with_its_last_good_checkpoint(head, tmp_path):
    """lr 1e30 makes step 2's loss NaN. The worker refuses the step and tells the driver, which
    stops (a restart would replay the same step), tags the MLflow run and marks it FAILED, names
    the last good checkpoint (step 1's, finite) and writes no final checkpoint."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from maskgil.training.ray_trainer import NONFINITE_TAG

    shards, db = tmp_path / "shards", tmp_path / "mlflow.db"
    write_token_shards(shards)
    cmd = [sys.executable, str(ROOT / "pipelines/train.py"), "--config", str(CONFIGS / "train_maskgil_tiny.yaml"),
           "--shards", str(shards), "--output", str(tmp_path / "final"), "--name", "diverges",
           "--tracking-uri", f"sqlite:///{db}",
           "--set", "train.max_steps=6", "train.global_batch=8", "train.checkpoint_every=1", "train.lr=1e30",
           "train.warmup_steps=0", "train.model_overrides={n_layers: 1, dim: 32, n_heads: 2, vocab_size: 32, "
           "num_classes: 4}", "scaling.num_workers=1", "run.max_failures=2", f"run.storage_path={tmp_path / 'ray'}"]
    r = subprocess.run(cmd, env=dict(repo_env(), RAY_ADDRESS=head), capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "training stopped: non-finite training signal at step 1" in r.stderr, r.stderr[-5000:]
    assert "step_00000001" in r.stderr and not (tmp_path / "final").exists()
    run = MlflowClient(f"sqlite:///{db}").search_runs(
        [MlflowClient(f"sqlite:///{db}").get_experiment_by_name("maskgil-train").experiment_id])[0]
    assert run.info.status == "FAILED" and "step 1" in run.data.tags[NONFINITE_TAG]
    good = load_file(str(tmp_path / "ray" / "diverges" / "step_00000001" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())


@pytest.mark.cluster
@pytest.mark.slow
def test_fsdp_run_on_cpu_workers_resumes_on_a_different_worker_count(head, tmp_path):
    """FSDP2 through Ray Train on 2 gloo workers, then the same run continued on 1 worker with
    compiled blocks (`train.compile`): the checkpoint holds full state dicts under the plain
    parameter names, so the step count carries over whatever the worker count or compile setting."""
    shards = tmp_path / "shards"
    write_token_shards(shards)
    db = tmp_path / "mlflow.db"

    def cmd(max_steps, workers, compiled):
        return [sys.executable, str(ROOT / "pipelines/train.py"), "--config", str(CONFIGS / "train_maskgil_tiny.yaml"),
                "--shards", str(shards), "--output", str(tmp_path / "final"), "--name", "fsdptest",
                "--tracking-uri", f"sqlite:///{db}",
                "--set", f"train.max_steps={max_steps}", "train.global_batch=8", "train.checkpoint_every=2",
                "train.log_every=1", "train.warmup_steps=0", "train.strategy=fsdp", f"train.compile={compiled}",
                "train.model_overrides={n_layers: 1, dim: 32, n_heads: 2, vocab_size: 32, num_classes: 4}",
                f"scaling.num_workers={workers}", "scaling.cpus_per_worker=0.5", f"run.storage_path={tmp_path / 'ray'}",
                "data.shuffle_buffer=0", "data.in_memory=false"]  # the lazy read (the other tests materialize)

    outs = []
    for max_steps, workers, compiled in ((4, 2, False), (6, 1, cpu_compile_available())):
        r = subprocess.run(cmd(max_steps, workers, compiled), env=dict(repo_env(), RAY_ADDRESS=head), capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        outs.append(json.loads(r.stdout[r.stdout.index("{"):r.stdout.index("}") + 1]))
    assert [o["step"] for o in outs] == [4, 6] and outs[0]["run_id"] == outs[1]["run_id"]
    run_id = outs[0]["run_id"]
    assert metric_history(db, run_id, "resumed_from_step") == [(4, 4.0)]
    assert [s for s, _ in metric_history(db, run_id, "loss")] == [1, 2, 3, 4, 5, 6]  # none lost, none repeated
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(f"sqlite:///{db}").get_run(run_id).data.tags  # the last attempt's placement
    assert (tags["maskgil.strategy"], tags["maskgil.device"], tags["maskgil.num_workers"]) == ("fsdp", "cpu", "1")


def test_conditioning_must_match_the_shards(tmp_path):
    """A class-conditional model refuses caption shards (and the reverse) before any Ray work."""
    from maskgil.training.ray_trainer import run_training
    from maskgil.training.runconfig import load_run_config

    write_token_shards(tmp_path / "captions", target="caption")
    write_token_shards(tmp_path / "labels")
    tiny = {"n_layers": 1, "dim": 32, "n_heads": 2, "vocab_size": 32}
    for config, shards, want in (("train_maskgil_tiny.yaml", "captions", "pretokenize with --target label"),
                                 ("train_maskgil_t2i_tiny.yaml", "labels", "pretokenize with --target caption")):
        cfg = load_run_config(CONFIGS / config, {"data": {"shards": str(tmp_path / shards)},
                                                 "run": {"storage_path": str(tmp_path / "ray")}})
        cfg["train"]["model_overrides"] = {**cfg["train"]["model_overrides"], **tiny}
        with pytest.raises(ValueError, match=want):
            run_training(cfg)


def test_shards_of_another_codebook_are_refused_before_any_ray_work(tmp_path):
    """Token ids the model's vocabulary cannot hold (a 64-code tokenizer's shards, a 32-code model)
    are refused by check_run with the setting that fixes it."""
    from maskgil.training.ray_trainer import check_run

    write_token_shards(tmp_path / "c64", vocab=64)
    cfg = load_run_config(CONFIGS / "train_maskgil_tiny.yaml", {"data": {"shards": str(tmp_path / "c64")},
                                                                  "run": {"storage_path": str(tmp_path / "ray")}})
    cfg["train"]["model_overrides"] = {**cfg["train"]["model_overrides"], "vocab_size": 32, "num_classes": 4}
    with pytest.raises(ValueError, match="64-code tokenizer but the model's vocab_size is 32: set "
                                         "train.model_overrides.vocab_size=64"):
        check_run(cfg)
    cfg["train"]["model_overrides"]["vocab_size"] = 64
    grids, bucketed, codebook = check_run(cfg)
    assert codebook == 64 and grids == {(8, 8): str(tmp_path / "c64")} and bucketed == {}


def test_labels_the_model_has_no_class_for_are_refused_before_any_ray_work(tmp_path):
    """Labels beyond the model's num_classes (a tiny preset's 16 on 1000-class shards), or negative ones
    (shards written before pretokenize quarantined unlabelled images), fail inside a worker as an
    IndexError; the driver names the fix before Ray starts."""
    from maskgil.training.ray_trainer import run_training
    from maskgil.training.runconfig import load_run_config

    write_token_shards(tmp_path / "four", classes=4, files=2)
    write_token_shards(tmp_path / "minus", classes=4, first_label=-1)
    tiny = {"n_layers": 1, "dim": 32, "n_heads": 2, "vocab_size": 32}
    for shards, classes, want in (("four", 3, r"labels up to 3 but the model has num_classes=3: set "
                                             r"train.model_overrides.num_classes=4"),
                                  ("minus", 4, "class label -1: labels must be >= 0")):
        cfg = load_run_config(CONFIGS / "train_maskgil_tiny.yaml", {"data": {"shards": str(tmp_path / shards)},
                                                                      "run": {"storage_path": str(tmp_path / "ray")}})
        cfg["train"]["model_overrides"] = {**cfg["train"]["model_overrides"], **tiny, "num_classes": classes}
        with pytest.raises(ValueError, match=want):
            run_training(cfg)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
@pytest.mark.parametrize("pipeline", ["train", "train_tokenizer"])
def test_a_gpu_run_on_a_machine_without_gpus_fails_at_once(pipeline, tmp_path):
    """Asking a private local Ray instance for GPU workers it does not have used to leave Ray Train
    retrying the worker group every minute, forever; now the run stops before fit() with the reason."""
    if pipeline == "train":
        write_token_shards(tmp_path / "shards")
        args = ["--config", str(CONFIGS / "train_maskgil_tiny.yaml"), "--shards", str(tmp_path / "shards"),
                "--output", str(tmp_path / "out"), "--set", "train.max_steps=2", "train.global_batch=8",
                f"run.storage_path={tmp_path / 'ray'}", "scaling.use_gpu=true", "scaling.num_workers=1",
                "train.model_overrides={n_layers: 1, dim: 32, n_heads: 2, vocab_size: 32, num_classes: 4}"]
        need, fix = "1 GPU (1 workers x 1)", "set scaling.use_gpu=false"
    else:
        args = ["--out", str(tmp_path / "out"), "--steps", "2", "--n-images", "32", "--use-gpu",
                "--storage-path", str(tmp_path / "ray")]
        need, fix = "2 GPU (2 workers x 1)", "drop --use-gpu"
    cmd = [sys.executable, str(ROOT / f"pipelines/{pipeline}.py"), *args,
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    r = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0
    assert f"this run needs {need} where the cluster has 0" in r.stderr, r.stderr[-3000:]
    assert fix in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.cluster
@pytest.mark.slow
def test_text_conditional_run_on_caption_shards(head, tmp_path):
    """pipelines/train.py with the text-to-image config on caption shards with aspect-ratio buckets
    (6x10 and 10x6 token grids, none of the model's 8x8), on 2 workers: each worker encodes its
    captions with the packaged MiniLM and trains on one-grid batches of every bucket (the 8x8 rows
    alone would be none), and the ranks, which may fill different numbers of batches, keep step;
    rank 0 logs sample grids (at the stage's grid and each bucket's) drawn from the captions it saw,
    and the final checkpoint names its text encoder so samplers and Serve rebuild the same one."""
    from maskgil.tokenizers import build_tokenizer

    shards = tmp_path / "shards"
    write_token_shards(shards, vocab=512, target="caption", buckets={(6, 10): 37, (10, 6): 27})
    build_tokenizer("llamagen-vq-tiny").save_pretrained(tmp_path / "tok")
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, str(ROOT / "pipelines/train.py"), "--config", str(CONFIGS / "train_maskgil_t2i_tiny.yaml"),
           "--shards", str(shards), "--output", str(tmp_path / "final"), "--name", "t2itest",
           "--tokenizer", str(tmp_path / "tok"), "--tracking-uri", f"sqlite:///{db}",
           "--set", "train.max_steps=10", "train.global_batch=8", "train.checkpoint_every=5", "train.log_every=1",
           "train.warmup_steps=0", "train.model_overrides={n_layers: 1, dim: 32, n_heads: 2, multiple_of: 32, "
           "cond: text, text_dim: 384, text_len: 16, text_encoder: all-minilm-l6-v2}", "scaling.num_workers=2",
           "scaling.cpus_per_worker=0.5",
           "sample.per_class=1", f"run.storage_path={tmp_path / 'ray'}", "data.shuffle_buffer=0"]
    r = subprocess.run(cmd, env=dict(repo_env(), RAY_ADDRESS=head), capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    out = json.loads(r.stdout[r.stdout.index("{"):r.stdout.index("}") + 1])
    assert out["step"] == 10
    assert [s for s, _ in metric_history(db, out["run_id"], "loss")] == list(range(1, 11))
    # 64 rows over 2 workers, 4 per micro-batch: at most 8 one-grid batches per worker and epoch, so
    # 10 steps cross an epoch boundary
    assert metric_history(db, out["run_id"], "epoch")[-1][1] >= 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    assert client.get_run(out["run_id"]).data.params["data.buckets.8x8"] == "[[80, 48], [48, 80]]"
    arts = client.list_artifacts(out["run_id"], "samples")
    assert [a.path for a in arts] == ["samples/samples_step00000010.png", "samples/samples_step00000010_10x6.png",
                                      "samples/samples_step00000010_6x10.png"]  # the stage's grid and each bucket's
    from maskgil.checkpoint import load_pretrained
    from maskgil.sampling import sample_maskgit
    from maskgil.text import TextEncoder

    model = load_pretrained(out["checkpoint"]).eval()
    assert (model.config.cond, model.config.text_encoder, model.config.text_len) == ("text", "all-minilm-l6-v2", 16)
    feats, mask = TextEncoder.for_model(model).encode(["a red shape number 0"])
    for grid in ((8, 8), (6, 10)):
        assert sample_maskgit(model, feats, grid, steps=2, text_mask=mask).shape == (1, grid[0] * grid[1])
