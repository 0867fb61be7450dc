"""The Ray parts on a GPU, end to end on one local head (`ray start --head`, which detects the GPU):

1. `ray job submit -- python pipelines/pretokenize.py` with the tokenizer actors on the GPU, checked
   against the same job with CPU actors;
2. `pipelines/train.py` on a GPU Ray Train worker: FSDP2 bf16 over NCCL, then the same run resumed
   under DDP with bf16 autocast, sampling a PNG on the GPU at the end;
3. `serve run` of the app from `ray_configs/serve_gpu.yaml` with the AR, MAR and decoder replicas
   sharing the GPU, checked against the library run in this process on the same GPU.

Skipped without CUDA (CI has none) and where Ray or MLflow is not installed (a bare GPU image);
`benchmarks/gpu_checks.sh` runs it on a GPU box with the project installed.
"""
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from ray_head import RAY, head_env, local_head, wait_healthy

pytest.importorskip("ray", reason="the Ray stages need Ray on the GPU box")
pytest.importorskip("mlflow", reason="the pipelines log to MLflow")

from maskgil.data.embedded import write_imagenet_folder  # noqa: E402
from maskgil.tokenizers import build_tokenizer  # noqa: E402

USE_GPU = True  # what every stage asks Ray for; the module is skipped where there is no GPU
pytestmark = [pytest.mark.skipif(USE_GPU and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
GCS_PORT, DASHBOARD_PORT, HTTP_PORT = 6620, 8620, 18820
GCS = f"127.0.0.1:{GCS_PORT}"  # the `head` fixture yields the dashboard URL, for `ray job submit`
SMALL = {"n_layers": 2, "dim": 64, "n_heads": 2, "vocab_size": 512, "num_classes": 16}  # llamagen-vq-tiny codes


def _env():
    """Environment of the head (so of its workers) and of the CLI calls: the repo, plus the absolute
    entries of this PYTHONPATH (a GPU box may hold Ray on a path rather than installed)."""
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.path.isabs(p)]
    return dict(head_env(), PYTHONPATH=os.pathsep.join([str(ROOT), *extra]))


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with local_head(tmp_path_factory.mktemp("head"), "mgg", GCS_PORT, DASHBOARD_PORT, 10600, (10620, 10699),
                    env=_env(), num_cpus=6) as url:
        yield url


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Embedded images (64 px, 16 classes) and a tiny tokenizer checkpoint, shared by the stages."""
    d = tmp_path_factory.mktemp("gpu_ray")
    write_imagenet_folder(d / "data", n_train=48, n_val=0, size=64, seed=3)
    torch.manual_seed(0)
    build_tokenizer("llamagen-vq-tiny").save_pretrained(d / "tok", extra={"name": "llamagen-vq-tiny"})
    return d


def _rows(out: Path) -> dict:
    """source -> (label, tokens) over every shard of a pretokenize output."""
    rows = {}
    for f in sorted(out.rglob("*.parquet")):
        t = pq.read_table(f).to_pydict()
        for src, label, tok in zip(t["source"], t["label"], t["tokens"]):
            rows[src] = (label, np.asarray(tok))
    return rows


def _pretokenize(head, work, out: Path, gpus: int, db: Path):
    cmd = RAY + ["job", "submit", "--address", head, "--working-dir", str(ROOT), "--",
                 "python", "pipelines/pretokenize.py", "--source", str(work / "data" / "train"), "--format", "imagenet",
                 "--out", str(out), "--tokenizer", str(work / "tok"), "--image-size", "64", "--rows-per-shard", "16",
                 "--batch-size", "16", "--gpus-per-tokenizer", str(gpus), "--tracking-uri", f"sqlite:///{db}"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=480)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


@pytest.fixture(scope="module")
def gpu_shards(head, work):
    """The token shards written by GPU tokenizer actors (training reads them), and the job's log."""
    out = work / "tokens_gpu"
    return out, _pretokenize(head, work, out, 1 if USE_GPU else 0, work / "pretok.db")


def test_pretokenize_on_gpu_actors_matches_cpu_actors(head, work, gpu_shards):
    db = work / "pretok.db"
    gpu_log = gpu_shards[1]
    cpu_log = _pretokenize(head, work, work / "tokens_cpu", 0, db)
    device = "cuda" if USE_GPU else "cpu"
    assert f"tokenized on {device}" in gpu_log and "tokenized on cpu" in cpu_log
    assert "seen 48 = written 48 + quarantined 0 [OK]" in gpu_log, gpu_log[-2000:]
    con = sqlite3.connect(db)
    tags = [v for (v,) in con.execute("select value from tags where key = 'tokenizer_device'")]
    con.close()
    assert sorted(tags) == sorted([device, "cpu"])
    gpu, cpu = _rows(work / "tokens_gpu"), _rows(work / "tokens_cpu")
    assert gpu.keys() == cpu.keys() and len(gpu) == 48
    assert all(gpu[s][0] == cpu[s][0] for s in gpu)
    same = np.mean([np.mean(gpu[s][1] == cpu[s][1]) for s in gpu])
    # Nearest-code search on the GPU (TF32 convolutions) may flip a near-tie; anything else is a bug.
    assert same >= 0.98, f"GPU and CPU tokenizer actors agree on only {same:.1%} of the tokens"


def _train(work, shards, max_steps, strategy, precision):
    overrides = "{" + ", ".join(f"{k}: {v}" for k, v in SMALL.items()) + "}"
    cmd = [sys.executable, str(ROOT / "pipelines/train.py"), "--config", str(ROOT / "ray_configs/train_maskgil_tiny.yaml"),
           "--shards", str(shards), "--output", str(work / "final"), "--name", "gputest",
           "--tracking-uri", f"sqlite:///{work / 'train.db'}", "--tokenizer", str(work / "tok"),
           "--set", f"train.max_steps={max_steps}", "train.global_batch=8", "train.checkpoint_every=2",
           "train.log_every=1", "train.warmup_steps=0", f"train.strategy={strategy}", f"train.precision={precision}",
           f"train.model_overrides={overrides}", "scaling.num_workers=1", f"scaling.use_gpu={str(USE_GPU).lower()}",
           "scaling.cpus_per_worker=1", f"run.storage_path={work / 'ray'}", "data.shuffle_buffer=0",
           "sample.per_class=1"]
    r = subprocess.run(cmd, env=dict(_env(), RAY_ADDRESS=GCS), capture_output=True, text=True, timeout=420, cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(r.stdout[r.stdout.index("{"):r.stdout.index("}") + 1])


def test_ray_train_on_gpu_fsdp2_bf16_then_resumed_under_ddp(work, gpu_shards):
    from mlflow.tracking import MlflowClient

    first = _train(work, gpu_shards[0], 4, "fsdp", "bf16")
    second = _train(work, gpu_shards[0], 6, "ddp", "bf16")
    assert (first["step"], second["step"]) == (4, 6) and first["run_id"] == second["run_id"]
    client = MlflowClient(f"sqlite:///{work / 'train.db'}")
    run = client.get_run(first["run_id"])
    assert run.data.tags["maskgil.device"] == ("cuda" if USE_GPU else "cpu")
    assert run.data.tags["maskgil.strategy"] == "ddp"  # the last attempt's
    losses = sorted((m.step, m.value) for m in client.get_metric_history(first["run_id"], "loss"))
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(v) for _, v in losses)
    assert [(m.step, m.value) for m in client.get_metric_history(first["run_id"], "resumed_from_step")] == [(4, 4.0)]
    # DDP's rank 0 sampled and decoded a class grid on its device at the end.
    assert any(a.path.endswith(".png") for a in client.list_artifacts(first["run_id"], "samples"))
    # The final checkpoint is a plain save_pretrained dir: it loads on the CPU and samples.
    from maskgil.checkpoint import load_pretrained
    from maskgil.sampling import sample_maskgit

    model = load_pretrained(second["checkpoint"])
    tokens = sample_maskgit(model, torch.arange(2), (8, 8), steps=4, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 64) and int(tokens.min()) >= 0 and int(tokens.max()) < SMALL["vocab_size"]


def test_serve_replicas_on_the_gpu_match_the_library_on_the_same_gpu(head, work):
    httpx = pytest.importorskip("httpx")
    from maskgil.checkpoint import load_pretrained, save_pretrained
    from maskgil.models import build_model
    from maskgil.sampling import sample_fusion
    from maskgil.serving.engine import make_generator
    from maskgil.tokenizers import load_tokenizer

    torch.manual_seed(1)
    save_pretrained(build_model("maskgil-tiny", **SMALL), work / "serve_mar")
    save_pretrained(build_model("llamagen-tiny", **SMALL), work / "serve_ar")
    cfg = yaml.safe_load((ROOT / "ray_configs" / "serve_gpu.yaml").read_text())
    cfg["http_options"]["port"] = HTTP_PORT
    app = cfg["applications"][0]
    app["args"].update(mar=str(work / "serve_mar"), ar=str(work / "serve_ar"), tokenizer=str(work / "tok"),
                       device="cuda" if USE_GPU else "cpu", num_gpus=0.3 if USE_GPU else 0, num_cpus=0.5,
                       max_replicas=1)
    for d in app["deployments"]:  # one replica each, all on the one GPU
        d["autoscaling_config"].update(min_replicas=1, max_replicas=1)
        if "ray_actor_options" in d:
            d["ray_actor_options"] = {"num_cpus": 0.5, "num_gpus": 0.25 if USE_GPU else 0}
    path = work / "serve_gpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "run", "--non-blocking", "-a", GCS, str(path)],
                       cwd=ROOT, env=_env(), timeout=240, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    base = f"http://127.0.0.1:{HTTP_PORT}"
    try:
        wait_healthy(base, 240)
        with httpx.Client(base_url=base, timeout=120) as c:
            device = "cuda" if USE_GPU else "cpu"
            m = c.get("/models").json()
            assert [m[k]["device"].split(":")[0] for k in ("ar", "mar", "tokenizer")] == [device] * 3
            body = {"class_id": 3, "seed": 11, "steps": 4, "cfg_scale": 2.0, "ar_share": 0.5, "num_images": 2,
                    "output": "json"}
            res = c.post("/generate", json=body)
            assert res.status_code == 200, res.text
            d = res.json()
            assert c.post("/generate", json={"class_id": "three"}).status_code == 422
    finally:
        subprocess.run([sys.executable, "-m", "ray.serve.scripts", "shutdown", "-a", GCS, "-y"], env=_env(),
                       timeout=120, capture_output=True)
    # The library on the same device, with the same seed: AR writes 32 tokens, MAR completes them.
    dev = torch.device(device)
    ar, mar = load_pretrained(work / "serve_ar").to(dev), load_pretrained(work / "serve_mar").to(dev)
    ref = sample_fusion(ar, mar, torch.full((2,), 3, device=dev), (8, 8), ar_tokens=32, mar_steps=4, cfg_scale=2.0,
                        generator=make_generator(dev, 11)).cpu()
    got = torch.tensor(d["tokens"])
    assert got.shape == (2, 64) and d["ar_tokens"] == 32
    same = (got == ref).float().mean().item()
    assert same >= 0.98, f"served tokens agree with the library on the same GPU for only {same:.1%}"
    images = load_tokenizer(work / "tok").decode(got.view(2, 8, 8))
    assert images.shape == (2, 3, 64, 64) and len(d["images"]) == 2
