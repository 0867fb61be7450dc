"""Run files for `pipelines/train.py`: YAML with sections train / data / scaling / run / sample.

`train` maps onto `TrainConfig`; the other sections describe where data and outputs live and how
many Ray workers run. Unknown keys are errors (a typo must not silently fall back to a default).
Overrides on the command line use dotted keys: `--set train.max_steps=200 scaling.num_workers=4`.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from maskgil.checkpoint import typed_value
from maskgil.models.presets import preset_config
from maskgil.sampling.logits import check_sampling_args
from maskgil.training.distributed import resolve_strategy
from maskgil.training.loop import TrainConfig

DEFAULTS = {
    "train": {},
    # shards: a dir, or {"HxW": dir} per grid. in_memory: materialize the token dataset in Ray's
    # object store once, so later epochs do not re-run the read (for shard sets that fit there).
    # preserve_order: read and split the blocks in a fixed order, so a rerun with the same seed and
    # worker count trains the same model bit for bit; false lets Ray Data hand out blocks as reads
    # finish and by locality (faster ingest on large multi-node runs, not reproducible).
    "data": {"shards": None, "shuffle_buffer": 8192, "in_memory": False, "preserve_order": True},
    "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1.0, "gpus_per_worker": 1.0,
                "threads_per_worker": 1},
    "run": {"name": None, "storage_path": "runs/ray_train", "max_failures": 0, "tracking_uri": "sqlite:///mlflow.db",
            "experiment": "maskgil-train", "output": None, "tokenizer": None, "tags": {}},
    "sample": {"classes": None, "prompts": None, "per_class": 2, "cfg_scale": 2.0, "steps": 8, "temperature": 1.0,
               "choice_temperature": 4.5, "top_k": None},
}
# What reading a run file and its overrides raises for a user's mistake (missing file, bad YAML, unknown
# key, wrong type): the pipelines print it as a usage error instead of a traceback.
CONFIG_ERRORS = (OSError, ValueError, yaml.YAMLError)
# What the keys that default to None take; every other key takes its default's type.
NULLABLE_TYPES = {"data.shards": str | dict | None, "run.name": str | None, "run.output": str | None,
                  "run.tokenizer": str | None, "sample.classes": list | None, "sample.prompts": list | None,
                  "sample.top_k": int | None}

# Accepted ranges of the numeric keys outside `train` (TrainConfig checks its own): a value outside
# fails only inside a Ray worker, or at the end of a run when the final sample grid is drawn.
RANGES = {"data.shuffle_buffer": (">= 0 (0: no local shuffle)", lambda v: v >= 0),
          "scaling.threads_per_worker": (">= 1", lambda v: v >= 1),
          "scaling.cpus_per_worker": ("> 0", lambda v: v > 0), "scaling.gpus_per_worker": ("> 0", lambda v: v > 0),
          "run.max_failures": (">= -1 (-1: retry forever)", lambda v: v >= -1),
          "sample.per_class": (">= 1", lambda v: v >= 1), "sample.steps": (">= 1", lambda v: v >= 1)}


def _merge(base: dict, new: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in (new or {}).items():
        if where == "" and k not in DEFAULTS:
            raise ValueError(f"unknown section {k!r} in run config; sections: {sorted(DEFAULTS)}")
        if where and where != "train" and k not in base:
            raise ValueError(f"unknown key {where}.{k}; known: {sorted(base)}")
        if where == "train" and k == "model_overrides" and isinstance(v, dict) and isinstance(base.get(k), dict):
            out[k] = {**base[k], **v}  # one field changed, the file's other model fields kept
        else:
            out[k] = _merge(base[k], v, k) if where == "" else v
    return out


def parse_overrides(items: list[str]) -> dict:
    """['train.max_steps=200', 'train.model_overrides.dim=64'] -> nested dict, values parsed as YAML
    scalars/lists. model_overrides merge field by field into the run file's."""
    out: dict = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        *parents, name = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} sets a field inside {part!r}, which another override set whole")
        node[name] = yaml.safe_load(value)
    return out


def load_run_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Defaults <- YAML file <- overrides, validated; `train` is checked by building a TrainConfig."""
    data = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a run config is a mapping of sections")
    cfg = _merge(DEFAULTS, data, "")
    cfg = _merge(cfg, overrides or {}, "")
    for section, values in cfg.items():
        if section != "train":
            for key, value in values.items():
                name = f"{section}.{key}"
                values[key] = typed_value(value, NULLABLE_TYPES.get(name, type(DEFAULTS[section][key])), name)
                accepted, ok = RANGES.get(name, (None, None))
                if ok is not None and not ok(values[key]):
                    raise ValueError(f"{name} must be {accepted}, got {values[key]!r}")
    try:  # the sampler's own check: the end-of-run grid accepts what the sampler does
        check_sampling_args(cfg["sample"]["temperature"], cfg["sample"]["top_k"], cfg_scale=cfg["sample"]["cfg_scale"])
    except ValueError as e:
        raise ValueError(f"sample.{e}") from None
    train = TrainConfig.from_dict(cfg["train"])  # raises on unknown keys and wrong types (workers coerce alike)
    try:  # the model a worker will build: the preset exists and the overrides fit its config
        preset_config(train.preset, **train.model_overrides)
    except KeyError as e:
        raise ValueError(f"train.preset: {e.args[0]}") from None
    except TypeError as e:
        raise ValueError(f"train.model_overrides: {e.args[0]}") from None
    if cfg["scaling"]["num_workers"] < 1:
        raise ValueError("scaling.num_workers must be >= 1")
    try:  # what the workers will resolve (strategy 'none' needs one worker): fail here, not inside them
        resolve_strategy(train.strategy, train.preset, cfg["scaling"]["num_workers"], cfg["scaling"]["use_gpu"])
    except ValueError as e:
        raise ValueError(f"train.{e}") from None
    return cfg


def worker_resources(scaling: dict) -> dict[str, float]:
    """Ray resources of one training worker from a run config's `scaling` section."""
    resources = {"CPU": float(scaling["cpus_per_worker"])}
    if scaling["use_gpu"]:
        resources["GPU"] = float(scaling["gpus_per_worker"])
    return resources


def shard_dirs(cfg: dict, default_grid: tuple[int, int]) -> dict[tuple[int, int], str]:
    """{grid: shard dir}. One dir serves the default grid; weak-to-strong runs map each grid to its
    own shards, e.g. {"16x16": tokens_256px, "32x32": tokens_512px} (same tokenizer, two image sizes)."""
    shards = cfg["data"]["shards"]
    if shards is None:
        raise ValueError("data.shards is required (a token shard directory written by pipelines/pretokenize.py)")
    if isinstance(shards, (str, Path)):
        return {tuple(default_grid): str(shards)}
    out = {}
    for key, d in shards.items():
        try:
            out[parse_grid(str(key))] = str(d)
        except ValueError:
            raise ValueError(f"data.shards keys must look like '16x16', got {key!r}") from None
    return out


def parse_grid(text: str) -> tuple[int, int]:
    """'16x16' / '6x10' -> (rows, columns) of a token grid."""
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a token grid looks like 16x16 (rows x columns), got {text!r}") from None
    return h, w


def absolute_tracking_uri(uri: str) -> str:
    """sqlite:///relative.db -> an absolute path: Ray workers, trials and callbacks run in other
    working directories and must reach the same database."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def flatten(d: dict, prefix: str = "") -> dict:
    """{"data": {"shards": x}} -> {"data.shards": x} (an empty dict stays a value): MLflow params,
    settings diffs."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
