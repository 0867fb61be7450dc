"""A real local Ray head (`ray start --head --block`) for cluster tests, on ports the caller owns.

Each test module passes its own port range so modules never collide; the head is stopped by its
own PID (SIGTERM to `ray start --block`), never by `ray stop`, which would stop every cluster.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def repo_env() -> dict:
    """This environment with the repository on PYTHONPATH, Ray auth off and no RAY_ADDRESS: for a
    head (so its workers) and the pipelines a test runs, which it points at its own head itself."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env.pop("RAY_ADDRESS", None)
    return env


def head_env() -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH="", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    return env


@contextlib.contextmanager
def local_head(log_dir, tag: str, gcs_port: int, dashboard_port: int, aux_base: int, worker_ports: tuple[int, int],
               env: dict | None = None, num_cpus: int = 2):
    """Yield the dashboard URL of a head using gcs_port, dashboard_port and aux_base+1..+7.
    `env` (default `head_env()`) is the environment of the head and so of its workers. GPUs are
    detected by `ray start` itself."""
    temp = f"/tmp/{tag}_ray_{os.getpid()}"  # short: Ray's socket paths must stay under ~100 chars
    aux = [f"--{name}={aux_base + i}" for i, name in enumerate(
        ["ray-client-server-port", "dashboard-agent-listen-port", "metrics-export-port", "dashboard-agent-grpc-port",
         "runtime-env-agent-port", "node-manager-port", "object-manager-port"], start=1)]
    cmd = RAY + ["start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
                 f"--num-cpus={num_cpus}", f"--temp-dir={temp}", *aux,
                 f"--min-worker-port={worker_ports[0]}", f"--max-worker-port={worker_ports[1]}"]
    log = open(os.path.join(log_dir, "head.log"), "w")
    # A throwaway head stops at once on SIGTERM: Ray would otherwise drain the node first, for up
    # to 30 s whenever a worker lease is still out (~30 s of teardown per cluster test).
    env = dict(env or head_env(), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
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


def wait_healthy(base_url: str, timeout_s: float, detail=lambda: "") -> None:
    """Poll `base_url`/healthz until it answers 200; after timeout_s raise, with `detail()` in the message."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(base_url + "/healthz", timeout=10) as r:
                if r.status == 200:
                    return
        except OSError:  # refused, reset, or an HTTP error status (503 while deployments start)
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{base_url} did not become healthy in {timeout_s:.0f} s {detail()}")
        time.sleep(1)
