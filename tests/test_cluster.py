"""maskgil.cluster.init_ray: how every pipeline starts or joins Ray (no cluster needed here)."""
from __future__ import annotations

import os
from pathlib import Path

import ray

from maskgil.cluster import cluster_address, init_ray, worker_group_shortfall

ROOT = Path(__file__).resolve().parents[1]


def _captured(monkeypatch) -> dict:
    seen: dict = {}
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    return seen


def test_workers_import_this_checkout_and_get_extra_env(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    seen = _captured(monkeypatch)
    init_ray("local", env={"MASKGIL_FAULT_STEP": "3"}, num_cpus=2)
    env = seen["runtime_env"]["env_vars"]
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]  # this checkout first, nothing lost
    assert env["MASKGIL_FAULT_STEP"] == "3"
    assert seen["address"] == "local" and seen["num_cpus"] == 2


def test_a_ray_job_keeps_its_own_runtime_env(monkeypatch):
    """Under `ray job submit` the job's working_dir already ships the code; the runtime env stays
    the one the job was submitted with."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    seen = _captured(monkeypatch)
    init_ray("auto", env={"X": "1"})
    assert "runtime_env" not in seen and seen["address"] == "auto"


def test_cluster_address_prefers_the_given_one_then_ray_address_then_local(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address() == "local"  # never a stranger's `ray start` on this machine
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address() == "10.0.0.1:6379"
    assert cluster_address("127.0.0.1:6380") == "127.0.0.1:6380"


def test_worker_group_shortfall_by_hand():
    assert worker_group_shortfall({"CPU": 0.5}, 2, {"CPU": 2.0}) is None
    assert worker_group_shortfall({"CPU": 1.0, "GPU": 1.0}, 8, {"CPU": 64.0, "GPU": 8.0}) is None
    assert worker_group_shortfall({"CPU": 1.0, "GPU": 1.0}, 8, {"CPU": 16.0, "GPU": 4.0}) == \
        "8 GPU (8 workers x 1) where the cluster has 4"
    assert worker_group_shortfall({"CPU": 1.5}, 2, {}) == "3 CPU (2 workers x 1.5) where the cluster has 0"
    # Two 4-GPU nodes hold 8 GPUs, but not one worker of 8: that worker would never be placed.
    two_nodes = [{"CPU": 32.0, "GPU": 4.0}, {"CPU": 32.0, "GPU": 4.0}]
    assert worker_group_shortfall({"CPU": 1.0, "GPU": 8.0}, 1, {"CPU": 64.0, "GPU": 8.0}, two_nodes) == \
        "1 CPU + 8 GPU on one node for each worker, where no node has that much (the most on any node: CPU 32, GPU 4)"
    assert worker_group_shortfall({"CPU": 1.0, "GPU": 4.0}, 2, {"CPU": 64.0, "GPU": 8.0}, two_nodes) is None
    # CPUs on one node and GPUs on another do not add up to a worker either
    split = [{"CPU": 8.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert worker_group_shortfall({"CPU": 2.0, "GPU": 1.0}, 1, {"CPU": 9.0, "GPU": 1.0}, split) is not None
