"""Checkpoint directories: `config.json` + `model.safetensors`.

One format for every model in the project (generators, tokenizers, classifiers), so any
pipeline can load any artefact by path. Loading never unpickles: weights come from safetensors,
the config from JSON, and the class from a registry keyed by `model_type`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

MODEL_REGISTRY: dict[str, type] = {}


def register_model(model_type: str) -> Callable[[type], type]:
    """Class decorator: make `cls` loadable by `load_pretrained` under `model_type`.

    The class must take its config dataclass as the only constructor argument and expose it as
    `self.config`; the config class is found as `cls.config_class`.
    """

    def wrap(cls: type) -> type:
        if model_type in MODEL_REGISTRY and MODEL_REGISTRY[model_type] is not cls:
            raise ValueError(f"model_type {model_type!r} registered twice")
        cls.model_type = model_type
        MODEL_REGISTRY[model_type] = cls
        return cls

    return wrap


class CheckpointMismatchError(ValueError):
    """Raised when a state dict does not fit a model; the message lists the first mismatches."""


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], limit: int = 10) -> None:
    """Raise `CheckpointMismatchError` unless `state_dict` has exactly the model's keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [f"{k}: checkpoint {got[k]} vs model {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{len(items)} {name}: " + ", ".join(items[:limit]) + more)
        raise CheckpointMismatchError(f"state dict does not fit {type(model).__name__}: " + "; ".join(parts))


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def check_known_fields(config_class: type, keys, what: str, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming every key that is not a field of `config_class`: a typo in a run file or an
    override must fail loudly, not silently fall back to a default."""
    known = {f.name for f in dataclasses.fields(config_class)}
    bad = sorted(set(keys) - known)
    if bad:
        raise error(f"unknown {what}(s) {bad}; known: {sorted(known)}")


def checked_fields(config_class: type, data: Mapping[str, Any], what: str, prefix: str = "",
                   error: type[Exception] = ValueError) -> dict:
    """`data` ready to build `config_class` from: unknown keys and values of the wrong type raise
    `error` naming the key (as `prefix` + key). Run files and `--set` overrides come through YAML,
    which reads `1e-4` as a string (YAML 1.1 wants `1.0e-4`): numeric strings become numbers where a
    number is expected, rather than failing later inside a Ray worker."""
    check_known_fields(config_class, data, what, error)
    hints = typing.get_type_hints(config_class)
    return {k: typed_value(v, hints[k], prefix + k, error) for k, v in data.items()}


def typed_value(value: Any, hint: Any, name: str, error: type[Exception] = ValueError) -> Any:
    """`value` checked against the annotation `hint` (bool, int, float, str, unions with None, tuples,
    lists, dicts; anything else passes): numeric strings become numbers, whole numbers (1e3) pass as
    ints, ints widen to float, lists become tuples. Raises `error` saying what `name` expected and got."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return typed_value(value, option, name, error)
            except error:
                continue
    elif hint is Any:
        return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint in (int, float):
        number = None if isinstance(value, bool) else value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if hint is float and isinstance(number, numbers.Real):
            return float(number)
        if isinstance(number, numbers.Integral):
            return int(number)
        if isinstance(number, numbers.Real) and float(number).is_integer():  # 1e3, 1.0e3: a whole number
            return int(number)
    elif hint is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    elif hint is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            if not args or (len(args) == 2 and args[1] is Ellipsis):
                item = args[0] if args else Any
                return tuple(typed_value(v, item, f"{name}[{i}]", error) for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(typed_value(v, a, f"{name}[{i}]", error) for i, (v, a) in enumerate(zip(value, args)))
    elif hint is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif hint is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        return value
    raise error(f"{name} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple and typing.get_args(hint):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", tuple: "a list"}
    return names.get(hint, names.get(typing.get_origin(hint), str(hint)))


def config_from_dict(config_class: type, data: Mapping[str, Any]) -> Any:
    """Build a config dataclass, ignoring unknown keys (forward compatibility) and restoring tuples."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            continue
        if isinstance(v, list) and "tuple" in str(fields[k].type):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kwargs[k] = v
    return config_class(**kwargs)


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as a checkpoint directory. `extra` lands in config.json under "extra"."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_type = getattr(type(model), "model_type", None)
    if model_type is None:
        raise TypeError(f"{type(model).__name__} is not registered with @register_model")
    # The config text first: an `extra` JSON cannot hold fails here, before any file is touched.
    meta = {"model_type": model_type, "config": config_to_dict(model.config), "extra": dict(extra or {})}
    config_text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    # safetensors refuses shared storage: clone every tensor into its own contiguous buffer.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    # Both files are written whole and flushed to disk under temporary names, then renamed back to
    # back: a crash or kill leaves the last good checkpoint (or, between the two renames, new weights
    # beside the old config), never a truncated config.json.
    weights_tmp, config_tmp = path / (WEIGHTS_NAME + ".tmp"), path / (CONFIG_NAME + ".tmp")
    save_file(tensors, str(weights_tmp), metadata={"model_type": model_type})
    config_tmp.write_text(config_text)
    for tmp in (weights_tmp, config_tmp):
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(weights_tmp, path / WEIGHTS_NAME)
    os.replace(config_tmp, path / CONFIG_NAME)
    return path


def read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no {CONFIG_NAME})")
    return json.loads(cfg.read_text())


def load_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu", expected_type: type | None = None):
    """Load a checkpoint directory written by `save_pretrained` into its registered class."""
    # Import the model packages so their classes register themselves.
    import maskgil.classifier  # noqa: F401
    import maskgil.models  # noqa: F401
    import maskgil.tokenizers  # noqa: F401
    path = Path(path)
    meta = read_config(path)
    model_type = meta.get("model_type")
    if model_type not in MODEL_REGISTRY:
        raise ValueError(f"{path}: unknown model_type {model_type!r}; known: {sorted(MODEL_REGISTRY)}")
    cls = MODEL_REGISTRY[model_type]
    if expected_type is not None and not issubclass(cls, expected_type):
        raise TypeError(f"{path} holds a {cls.__name__}, expected {expected_type.__name__}")
    config = config_from_dict(cls.config_class, meta["config"])
    with torch.device("meta"):
        model = cls(config)
    state = load_file(str(path / WEIGHTS_NAME), device=str(map_location))
    check_state_dict(model, state)
    model.load_state_dict(state, assign=True)
    # Non-persistent buffers (e.g. RoPE tables) were built on meta: rebuild them for real.
    if hasattr(model, "reset_buffers"):
        model.reset_buffers(device=map_location)
    return model.eval()


def weights_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a checkpoint's weights file: names the exact tokenizer in token-shard manifests."""
    h = hashlib.sha256()
    with open(Path(path) / WEIGHTS_NAME, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
