"""`ray job submit -- python pipelines/pretokenize.py` against a local head this test starts.

The head runs as `ray start --head --block` in a child process with its own temp dir and ports
(6500 / 8500 / 105xx), and is stopped by terminating that child: never `ray stop`, which would
take down every other Ray cluster on the machine.
"""
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from maskgil.data.embedded import write_imagenet_folder
from maskgil.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GCS_PORT, DASHBOARD_PORT = 6500, 8500
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _env():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH="")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def head(tmp_path_factory):
    temp = f"/tmp/mgd_ray_{os.getpid()}"  # short: Ray's socket paths must stay under ~100 chars
    cmd = RAY + ["start", "--head", "--block", f"--port={GCS_PORT}", "--node-ip-address=127.0.0.1",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true",
                 "--num-cpus=2", f"--temp-dir={temp}", "--ray-client-server-port=10501",
                 "--dashboard-agent-listen-port=10502", "--metrics-export-port=10503",
                 "--dashboard-agent-grpc-port=10504", "--runtime-env-agent-port=10505", "--node-manager-port=10506",
                 "--object-manager-port=10507", "--min-worker-port=10520", "--max-worker-port=10599"]
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{DASHBOARD_PORT}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not come up; see {log.name}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()  # `ray start --block` stops the processes it started on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.cluster
@pytest.mark.slow
def test_ray_job_submit(head, tmp_path):
    data = tmp_path / "data"
    write_imagenet_folder(data, n_train=32, n_val=0, size=(40, 36), seed=2)
    (data / "train" / "00_red_circle" / "broken.JPEG").write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    build_tokenizer("llamagen-vq-tiny").save_pretrained(tmp_path / "tok", extra={"name": "llamagen-vq-tiny"})
    out, db = tmp_path / "tokens", tmp_path / "mlflow.db"
    cmd = RAY + ["job", "submit", "--address", head, "--working-dir", str(ROOT), "--",
                 "python", "pipelines/pretokenize.py", "--source", str(data / "train"), "--format", "imagenet",
                 "--out", str(out), "--tokenizer", str(tmp_path / "tok"), "--image-size", "32", "--rows-per-shard", "12",
                 "--batch-size", "8", "--tracking-uri", f"sqlite:///{db}"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=480)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "seen 33 = written 32 + quarantined 1 [OK]" in res.stdout, res.stdout[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert (m["inputs_seen"], m["inputs_written"], m["inputs_quarantined"], m["rows_written"]) == (33, 32, 1, 32)
    assert len(m["shards"]) == 3
    # The job logged an MLflow run with the counts and parameters.
    con = sqlite3.connect(db)
    metrics = dict(con.execute("select key, value from latest_metrics").fetchall())
    params = dict(con.execute("select key, value from params").fetchall())
    status = con.execute("select status from runs").fetchall()
    con.close()
    assert metrics["inputs_seen"] == 33 and metrics["inputs_quarantined"] == 1 and metrics["rows_written"] == 32
    assert params["format"] == "imagenet" and params["image_size"] == "32"
    assert status == [("FINISHED",)]
