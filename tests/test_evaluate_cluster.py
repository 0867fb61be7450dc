"""`ray job submit -- python pipelines/evaluate.py` against a local head this test starts.

The head runs as `ray start --head --block` in a child process with its own temp dir and ports
(6950-6999, dashboard 8950), stopped by PID in the finalizer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from test_evaluate_setup import TRAINING_RUN_ID, tiny_setup

ROOT = Path(__file__).resolve().parents[1]
GCS_PORT, DASHBOARD_PORT = 6950, 8950
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _env():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH="", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def head(tmp_path_factory):
    temp = f"/tmp/mge_ray_{os.getpid()}"  # short: Ray's socket paths must stay under ~100 chars
    cmd = RAY + ["start", "--head", "--block", f"--port={GCS_PORT}", "--node-ip-address=127.0.0.1",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true",
                 "--num-cpus=2", f"--temp-dir={temp}", "--ray-client-server-port=6951",
                 "--dashboard-agent-listen-port=6952", "--metrics-export-port=6953",
                 "--dashboard-agent-grpc-port=6954", "--runtime-env-agent-port=6955", "--node-manager-port=6956",
                 "--object-manager-port=6957", "--min-worker-port=6960", "--max-worker-port=6999"]
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
def test_ray_job_submit_evaluate(head, tmp_path, tmp_path_factory):
    import mlflow

    s = tiny_setup(tmp_path_factory.getbasetemp())
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    mlflow.MlflowClient(uri).create_experiment("evaluate", artifact_location=str(tmp_path / "artifacts"))
    cmd = RAY + ["job", "submit", "--address", head, "--working-dir", str(ROOT), "--",
                 "python", "pipelines/evaluate.py", "--tokenizer", s["tokenizer"], "--mar", s["mar"], "--ar", s["ar"],
                 "--sampler", "fusion", "--ar-tokens", "32", "--steps", "2", "--num-images", "16",
                 "--reference", s["reference"], "--cache-dir", s["cache"], "--classifier", "none",
                 "--npz", str(tmp_path / "samples.npz"), "--out", str(tmp_path / "out"), "--tracking-uri", uri,
                 "--batch-size", "4", "--cpus-per-actor", "0.5"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=480)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "result-fusion-k32-m2.json").read_text())
    assert result["num_generated"] == 16 and np.isfinite(result["fid"]) and result["model_steps"] == 34
    assert f"FID {result['fid']:.3f}  [{result['feature_network']} vs {result['reference']}]" in res.stdout
    with np.load(tmp_path / "samples.npz") as z:
        assert z["arr_0"].shape == (16, 64, 64, 3) and z["arr_0"].dtype == np.uint8
    run = mlflow.MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["parent_training_run"] == TRAINING_RUN_ID
