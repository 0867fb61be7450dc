"""The HTTP contract of the serving app: request schema, configurable limits, and checks that need
the loaded models (class count, tokenizer downsample). No Ray here: unit-tested without a cluster.

Static bounds live in the schema (pydantic -> 422 naming the field); bounds that depend on the
deployment (limits, model shapes) are checked by `check_request` and raise the same 422 shape.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from maskgil.sampling.schedules import reveal_counts

MAX_SEED = 2**63 - 1
MASKGIT_SCHEDULE = "cosine"  # the MAR replicas' mask schedule; with the steps, it fixes how many steps run


class Limits(BaseModel):
    """Per-deployment request limits (serve config `args.limits`)."""

    model_config = ConfigDict(extra="forbid")

    max_num_images: int = Field(16, ge=1)
    max_steps: int = Field(64, ge=1)
    max_cfg_scale: float = Field(20.0, ge=0)
    max_temperature: float = Field(10.0, gt=0)
    max_resolution: Optional[int] = Field(None, ge=1, description="pixels per side; default 2x the native size")
    max_prompt_chars: int = Field(1000, ge=1, description="longest prompt accepted (text-conditional models)")


class GenerateRequest(BaseModel):
    """POST /generate body. Numbers are strict: "3", 3.5 and true are rejected where an integer is
    due, "2.0" and true where a float is (an integer such as 2 is a float), rather than coerced."""

    model_config = ConfigDict(extra="forbid")

    class_id: Optional[StrictInt] = Field(None, ge=0, description="class to generate, in [0, num_classes) "
                                                                   "(class-conditional models)")
    prompt: Optional[StrictStr] = Field(None, min_length=1, description="what to draw (text-conditional models); "
                                                                       "cut at the model's text_len word pieces")
    cfg_scale: StrictFloat = Field(2.0, ge=0, allow_inf_nan=False,
                                   description="classifier-free guidance scale; 1 = off")
    cfg_schedule: Literal["constant", "linear"] = "constant"
    steps: StrictInt = Field(8, ge=1, description="MaskGIT steps for the tokens the AR model does not write")
    ar_share: StrictFloat = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                                  description="fraction of tokens (raster order) written by the AR model: "
                                              "0 = pure MAR, 1 = pure AR; k = round(ar_share * h * w)")
    temperature: StrictFloat = Field(1.0, gt=0, allow_inf_nan=False)
    top_k: Optional[StrictInt] = Field(None, ge=1)
    choice_temperature: StrictFloat = Field(4.5, ge=0, allow_inf_nan=False, description="MaskGIT confidence noise")
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED, description="omit for a random seed (returned)")
    num_images: StrictInt = Field(1, ge=1)
    resolution: Optional[Union[StrictInt, tuple[StrictInt, StrictInt]]] = Field(
        None, description="image size in pixels, N or [H, W], multiple of the tokenizer's downsample factor")
    output: Literal["png", "json"] = Field("png", description="png: one image (a grid for several); json: "
                                                             "base64 PNGs, token ids and per-stage timings")


class RequestError(ValueError):
    """A request that passed the schema but breaks a deployment limit; `field` names the culprit."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")
        self.field, self.msg = field, msg

    def detail(self) -> list[dict]:
        return [{"loc": ["body", self.field], "msg": self.msg, "type": "value_error"}]


@dataclass(frozen=True)
class ModelShape:
    """What the checks need to know about the deployed models."""

    num_classes: int
    vocab_size: int
    downsample: int
    native_grid: tuple[int, int]
    cond: Literal["class", "text"] = "class"


@dataclass(frozen=True)
class Plan:
    """A checked request resolved to what the replicas run."""

    grid: tuple[int, int]
    ar_tokens: int
    mar_steps: int  # MaskGIT steps that actually run on the tokens AR leaves

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def maskgit_steps_run(n_unknown: int, steps: int, schedule: str = MASKGIT_SCHEDULE) -> int:
    """Steps MaskGIT runs to reveal `n_unknown` tokens: it stops once none is left masked, so asking
    for more steps than there are unknown tokens runs fewer (and none when AR wrote every token)."""
    return sum(1 for revealed in reveal_counts(n_unknown, steps, schedule) if revealed > 0)


def json_safe(value):
    """`value` (JSON types, as from `jsonable_encoder`) with NaN and +-Infinity as the strings
    "NaN", "Infinity", "-Infinity": JSON has no such numbers, yet error bodies echo the client's
    input, which Python's parser reads them into."""
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def check_request(req: GenerateRequest, limits: Limits, shape: ModelShape) -> Plan:
    """Raise RequestError (-> 422) for anything the deployment cannot or will not serve."""
    if shape.cond == "text":
        if req.class_id is not None:
            raise RequestError("class_id", "the deployed models are text-conditional: send a prompt, not a class_id")
        if req.prompt is None or not req.prompt.strip():
            raise RequestError("prompt", "required by the deployed text-conditional models (a non-empty string)")
        if len(req.prompt) > limits.max_prompt_chars:
            raise RequestError("prompt", f"must be <= {limits.max_prompt_chars} characters (server limit), "
                                         f"got {len(req.prompt)}")
    elif req.prompt is not None:
        raise RequestError("prompt", "the deployed models are class-conditional: send a class_id, not a prompt")
    elif req.class_id is None:
        raise RequestError("class_id", f"required: a class in [0, {shape.num_classes})")
    elif req.class_id >= shape.num_classes:
        raise RequestError("class_id", f"must be < {shape.num_classes} (the model has {shape.num_classes} classes), "
                                       f"got {req.class_id}")
    if req.steps > limits.max_steps:
        raise RequestError("steps", f"must be <= {limits.max_steps} (server limit), got {req.steps}")
    if req.cfg_scale > limits.max_cfg_scale:
        raise RequestError("cfg_scale", f"must be <= {limits.max_cfg_scale} (server limit), got {req.cfg_scale}")
    if req.temperature > limits.max_temperature:
        raise RequestError("temperature", f"must be <= {limits.max_temperature} (server limit), got {req.temperature}")
    if req.num_images > limits.max_num_images:
        raise RequestError("num_images", f"must be <= {limits.max_num_images} (server limit), got {req.num_images}")
    if req.top_k is not None and req.top_k > shape.vocab_size:
        raise RequestError("top_k", f"must be <= the codebook size {shape.vocab_size}, got {req.top_k}")
    d = shape.downsample
    native = (shape.native_grid[0] * d, shape.native_grid[1] * d)
    if req.resolution is None:
        size = native
    elif isinstance(req.resolution, int):
        size = (req.resolution, req.resolution)
    else:
        size = tuple(req.resolution)
    max_side = limits.max_resolution or 2 * max(native)
    for side in size:
        if side < d or side % d:
            raise RequestError("resolution", f"each side must be a positive multiple of the tokenizer's downsample "
                                             f"factor {d}, got {list(size)}")
        if side > max_side:
            raise RequestError("resolution", f"each side must be <= {max_side} px (server limit), got {list(size)}")
    grid = (size[0] // d, size[1] // d)
    ar_tokens = round_half_up(req.ar_share * grid[0] * grid[1])
    return Plan(grid=grid, ar_tokens=ar_tokens, mar_steps=maskgit_steps_run(grid[0] * grid[1] - ar_tokens, req.steps))
