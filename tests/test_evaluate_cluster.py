"""`ray job submit -- python pipelines/evaluate.py` against a local head this test starts.

The head runs as `ray start --head --block` in a child process with its own temp dir and ports
(6950-6999, dashboard 8950), stopped by PID in the finalizer."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from ray_head import RAY, head_env, local_head

from test_evaluate_setup import TRAINING_RUN_ID, tiny_setup

ROOT = Path(__file__).resolve().parents[1]
GCS_PORT, DASHBOARD_PORT = 6950, 8950
@pytest.fixture
def head(tmp_path_factory):
    with local_head(tmp_path_factory.mktemp("head"), "mge", GCS_PORT, DASHBOARD_PORT, 6950, (6960, 6999)) as url:
        yield url


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
    res = subprocess.run(cmd, env=head_env(), capture_output=True, text=True, timeout=480)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "result-fusion-k32-m2.json").read_text())
    assert result["num_generated"] == 16 and np.isfinite(result["fid"]) and result["model_steps"] == 34
    assert f"FID {result['fid']:.3f}  [{result['feature_network']} vs {result['reference']}]" in res.stdout
    with np.load(tmp_path / "samples.npz") as z:
        assert z["arr_0"].shape == (16, 64, 64, 3) and z["arr_0"].dtype == np.uint8
    run = mlflow.MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["parent_training_run"] == TRAINING_RUN_ID
