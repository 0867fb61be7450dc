"""`ray job submit -- python pipelines/pretokenize.py` against a local head this test starts.

The head runs as `ray start --head --block` in a child process with its own temp dir and ports
(6500 / 8500 / 105xx), and is stopped by terminating that child: never `ray stop`, which would
take down every other Ray cluster on the machine.
"""
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from ray_head import RAY, head_env, local_head
import torch

from maskgil.data.embedded import write_imagenet_folder
from maskgil.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GCS_PORT, DASHBOARD_PORT = 6500, 8500
@pytest.fixture
def head(tmp_path_factory):
    with local_head(tmp_path_factory.mktemp("head"), "mgd", GCS_PORT, DASHBOARD_PORT, 10500, (10520, 10599)) as url:
        yield url


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
    res = subprocess.run(cmd, env=head_env(), capture_output=True, text=True, timeout=480)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "seen 33 = written 32 + quarantined 1 [OK]" in res.stdout, res.stdout[-3000:]
    assert "tokenized on cpu" in res.stdout  # the head has no GPU: CPU tokenizer actors
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
