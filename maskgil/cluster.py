"""Joining or starting Ray from a pipeline: one function, so every entry point sets up Ray the
same way (which cluster, and how its workers import this checkout)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cluster_address(explicit: str | None = None) -> str:
    """The address a pipeline uses: the one given, else $RAY_ADDRESS (set by `ray job submit`),
    else "local" (a private instance, never someone else's `ray start` on this machine)."""
    return explicit or os.environ.get("RAY_ADDRESS") or "local"


def init_ray(address: str | None = None, *, env: dict[str, str] | None = None, **kwargs) -> None:
    """`ray.init(address, **kwargs)` with this project's set-up. `address` reads as ray.init's
    ("local" starts a private instance, None joins $RAY_ADDRESS or the last `ray start` on this
    machine, else starts one). Outside a Ray job the workers import this checkout (PYTHONPATH) and
    get `env`; under `ray job submit` the job's own runtime env (its working_dir) is left alone."""
    import ray

    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                    **(env or {})}
        kwargs.setdefault("runtime_env", {"env_vars": env_vars})
    ray.init(address=address, **kwargs)


def worker_group_shortfall(per_worker: dict[str, float], num_workers: int, cluster: dict[str, float],
                           nodes: list[dict[str, float]] | None = None) -> str | None:
    """What a worker group needs beyond the cluster's total resources, or (given the alive `nodes`'
    resources) what one worker needs beyond any single node, in words; None if it fits. A worker is
    placed on one node: 8 GPUs a worker on two 4-GPU nodes never starts."""
    short = [f"{need:g} {k} ({num_workers} workers x {v:g}) where the cluster has {cluster.get(k, 0.0):g}"
             for k, v in per_worker.items() if (need := v * num_workers) > cluster.get(k, 0.0) + 1e-9]
    if not short and nodes and not any(all(v <= n.get(k, 0.0) + 1e-9 for k, v in per_worker.items()) for n in nodes):
        largest = ", ".join(f"{k} {max(n.get(k, 0.0) for n in nodes):g}" for k in per_worker)
        short = [f"{' + '.join(f'{v:g} {k}' for k, v in per_worker.items())} on one node for each worker, where no "
                 f"node has that much (the most on any node: {largest})"]
    return "; ".join(short) or None


def check_worker_group_fits(per_worker: dict[str, float], num_workers: int, cpu_hint: str, size_settings: str) -> None:
    """Before a Ray Train fit() or a Tune run: a worker group (or trial) larger than the cluster would
    leave Ray Train retrying its start every minute, or Tune waiting, forever. Where this process
    started Ray, nothing can add nodes, so that is an error; on a cluster an autoscaler may grow, a
    warning. `cpu_hint` says how to train on CPUs instead, `size_settings` which settings size the group."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    short = worker_group_shortfall(per_worker, num_workers, ray.cluster_resources(), nodes)
    if short is None:
        return
    hint = (f"{cpu_hint}, or " if "GPU" in short else "") + f"lower {size_settings}"
    if _ray_started_here():
        raise ValueError(f"this run needs {short}, and the local Ray instance it started cannot grow: {hint}")
    print(f"warning: this run needs {short}; it waits until the cluster grows (an autoscaler adding nodes), "
          f"or {hint}", flush=True)


def _ray_started_here() -> bool:
    """Whether this process started its Ray instance (then no autoscaler can add nodes)."""
    try:
        from ray._private.worker import global_worker

        return bool(global_worker.node.head)
    except Exception:  # private API: when in doubt, assume a cluster that may grow
        return False
