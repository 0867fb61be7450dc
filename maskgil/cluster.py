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
