"""Ray Serve app: AR and MAR model replicas composed by a FastAPI ingress into one fusion generator.

    serve run maskgil.serve:app                                   # the quickstart's checkpoints
    serve run maskgil.serve:app mar=DIR ar=DIR tokenizer=DIR      # or MASKGIL_MAR / _AR / _TOKENIZER
    serve deploy ray_configs/serve.yaml                           # replicas, GPUs, autoscaling, limits

Request path: HTTP proxy -> `Fusion` ingress (validation, seed, composition) -> `ARModel` writes the
first k = round(ar_share * h*w) tokens -> `MARModel` completes the rest in at most `steps` MaskGIT steps ->
`Decoder` turns tokens into PNGs. k = 0 never calls the AR replicas, k = h*w never calls MAR.
Model replicas batch compatible requests (`@serve.batch`, grouped by grid and sampling settings);
each request samples from its own generator seeded with its seed (see maskgil.serving.engine), so
a request returns the same image alone or batched, and a retried request the same image again.
"""

import asyncio
import base64
import dataclasses
import json
import os
import secrets
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal, Optional

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from maskgil.checkpoint import MODEL_REGISTRY, config_from_dict, read_config, weights_hash
from maskgil.serving.api import (MASKGIT_SCHEDULE, GenerateRequest, Limits, ModelShape, RequestError, check_request,
                                 json_safe)
from maskgil.images import image_grid, png_bytes, to_uint8_nhwc
from maskgil.serving.engine import Job, ar_batch, make_generator, maskgit_batch

QUICKSTART = {"mar": "runs/quickstart/maskgil", "ar": "runs/quickstart/llamagen", "tokenizer": "runs/quickstart/tokenizer"}
MAX_FAILURES_IN_A_ROW = 3
ENV = {"mar": "MASKGIL_MAR", "ar": "MASKGIL_AR", "tokenizer": "MASKGIL_TOKENIZER"}


class ServeArgs(BaseModel):
    """Application builder arguments (`serve run maskgil.serve:app key=value`, or `args:` in a config)."""

    model_config = ConfigDict(extra="forbid")

    mar: Optional[str] = Field(None, description="masked (MaskGIL) checkpoint dir; env MASKGIL_MAR")
    ar: Optional[str] = Field(None, description="causal (LlamaGen AR) checkpoint dir; env MASKGIL_AR")
    tokenizer: Optional[str] = Field(None, description="tokenizer checkpoint dir; env MASKGIL_TOKENIZER")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (AR, MAR, decoder)")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per model replica; torch threads = max(1, round(num_cpus))")
    max_replicas: int = Field(1, ge=1, description="autoscaling upper bound per model deployment")
    max_batch_size: int = Field(32, ge=1, description="requests per model batch; 1 turns batching off")
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_ongoing_requests: int = Field(64, ge=1, description="concurrent requests per ingress replica")
    max_queued_requests: int = Field(64, ge=-1, description="waiting beyond that -> HTTP 503; -1 = unbounded")
    request_timeout_s: float = Field(120.0, gt=0, description="per stage; then HTTP 504")
    decoder: Literal["deployment", "ingress"] = Field("deployment", description="where tokens become images")
    compile: bool = Field(False, description="torch.compile the AR decode step and the MAR forward (CPU: needs a "
                                             "C++ compiler); replicas build their graphs at start (seconds)")
    limits: Limits = Limits()


# ----------------------------------------------------------------------------- model replicas
def _pick_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but this replica sees no GPU (set num_gpus in the serve args/config)")
    return torch.device(device)


# Fields that make two configs the same architecture (training-only knobs like dropout excluded).
GENERATOR_SHAPE = ("dim", "n_layers", "n_heads", "causal", "rope", "qk_norm", "post_norm", "multiple_of")
TOKENIZER_SHAPE = ("ch", "ch_mult", "enc_res_blocks", "dec_res_blocks", "z_channels", "attn_at_lowest", "mid_attn",
                   "norm_groups", "norm", "codebook_size", "codebook_dim", "l2_norm")


def matching_preset(config: dict, tokenizer: bool = False) -> str | None:
    """Name of the library preset with the same architecture as `config`, if any."""
    if tokenizer:
        from maskgil.tokenizers import TOKENIZER_PRESETS as presets

        fields, configs = TOKENIZER_SHAPE, {n: c for n, (_, c) in presets.items()}
    else:
        from maskgil.models import PRESETS, preset_config

        fields, configs = GENERATOR_SHAPE, {n: preset_config(n) for n in PRESETS}
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 - JSON turns tuples into lists
    for name, c in configs.items():
        d = dataclasses.asdict(c)
        if all(f in d and f in config and norm(d[f]) == norm(config[f]) for f in fields):
            return name
    return None


def _model_info(path: str, model, device, tokenizer: bool = False) -> dict:
    meta = read_config(path)
    return {"path": path, "model_type": meta["model_type"], "preset": matching_preset(meta["config"], tokenizer),
            "config": meta["config"], "device": str(device), "parameters": sum(p.numel() for p in model.parameters()),
            "weights_sha256": weights_hash(path)}


class _Replica:
    """Shared replica plumbing: device, threads, batching knobs, health, error wrapping."""

    def _setup(self, device: str, threads: int, max_batch_size: int, batch_wait_timeout_s: float):
        torch.set_num_threads(threads)
        self.device = _pick_device(device)
        self._run.set_max_batch_size(max_batch_size)
        self._run.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.max_batch_size = max_batch_size
        self._failures_in_a_row = 0

    def _load_generator(self, path: str, compile: bool):
        from maskgil.checkpoint import load_pretrained

        self.model = load_pretrained(path, map_location=self.device)
        self.compile = compile
        self._info = {**_model_info(path, self.model, self.device), "compiled": compile}

    def _warm_up(self, shapes, run):
        """Build every compiled graph a batch can need now, not in the first callers' latency:
        `run(jobs, grid, cfg_scale)` once per (number of one-row jobs, cfg_scale) in `shapes`."""
        grid = tuple(self.model.config.grid_size)
        for n_jobs, cfg in shapes:
            run([self._job({"num_images": 1, "class_id": 0, "seed": 0}) for _ in range(n_jobs)], grid, cfg)

    def _probe_item(self) -> dict:
        """A request any working replica serves (a generator's: one image, native grid, one step or two
        tokens, no guidance: shapes compiled replicas warm up for)."""
        return {"num_images": 1, "class_id": 0, "seed": 0, "grid": tuple(self.model.config.grid_size),
                "cfg_scale": 1.0, "cfg_schedule": "constant", "temperature": 1.0, "top_k": None, "steps": 1,
                "choice_temperature": 0.0, "ar_tokens": 2}

    def _job(self, item: dict) -> Job:
        """A request's rows: its condition (class id, or the prompt's features padded to text_len
        from the ingress) repeated num_images times, and its own generator."""
        n, c = item["num_images"], self.model.config
        gen = make_generator(self.device, item["seed"], item.get("generator_state"))
        if c.cond == "text":
            feats = item.get("text")
            if feats is None:  # warm-up: any features of the right shape
                feats, mask = torch.zeros(c.text_len, c.text_dim), torch.ones(c.text_len, dtype=torch.bool)
            else:
                mask = item["text_mask"]
            return Job(feats.expand(n, -1, -1), gen, item.get("init_tokens"), mask.expand(n, -1))
        return Job(torch.full((n,), item["class_id"], dtype=torch.long), gen, item.get("init_tokens"))

    async def __call__(self, item: dict) -> dict:
        """One request; `_run` gathers concurrent calls into batches."""
        ok, value = await self._run(item)
        if not ok:
            raise value
        return value

    async def _run_groups(self, items: list[dict], key, compute) -> list:
        """Group `items` by `key`, run `compute(group)` per group in a worker thread (so the event
        loop keeps queueing the next batch), and return (ok, result | exception) per item."""
        groups = defaultdict(list)
        for i, it in enumerate(items):
            groups[key(it)].append(i)
        out: list = [None] * len(items)
        for idx in groups.values():
            group = [items[i] for i in idx]
            t0 = time.perf_counter()
            try:
                results = await asyncio.to_thread(compute, group)
            except Exception as e:  # noqa: BLE001 - reported to the caller, replica stays up
                self._failures_in_a_row += 1
                for i in idx:
                    out[i] = (False, e)
                continue
            self._failures_in_a_row = 0
            ms = (time.perf_counter() - t0) * 1e3
            batch = {"requests": len(group), "rows": sum(it["num_images"] for it in group)}
            for i, r in zip(idx, results):
                out[i] = (True, {**r, "compute_ms": ms, "batch": batch})
        return out

    def info(self) -> dict:
        """The loaded checkpoint, plus which replica answered (its Ray actor name)."""
        return {**self._info, "max_batch_size": self.max_batch_size,
                "replica_actor": ray.get_runtime_context().get_actor_name()}

    async def check_health(self):
        """Serve replaces the replica when this raises: when its GPU no longer runs a kernel, or when
        after MAX_FAILURES_IN_A_ROW failed batches a known-good request fails too (a sticky CUDA error,
        OOM). Failed batches alone do not condemn it: input that passed validation can still fail its
        own batch, and one client sending it must not get replicas replaced. The probe goes through
        the batch queue, so it never runs the model beside a batch."""
        if self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            ok, outcome = await self._run(self._probe_item())  # success resets the count
            if not ok:
                raise RuntimeError(f"{self._failures_in_a_row} batches in a row failed, a known-good request's "
                                   f"included; last: {outcome!r}")
        if self.device.type == "cuda":
            await asyncio.to_thread(lambda: torch.ones(1, device=self.device).add_(1).item())


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30)
class MARModel(_Replica):
    """A masked generator: completes token grids with MaskGIT decoding."""

    def __init__(self, path: str, device: str = "auto", threads: int = 1, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.005, compile: bool = False):
        self._setup(device, threads, max_batch_size, batch_wait_timeout_s)
        self._load_generator(path, compile)
        if self.model.mask_token_id is None:
            raise ValueError(f"{path} is not a masked model (causal={self.model.config.causal})")
        if compile:  # 2, 4 (the symbolic batch) and 1 rows
            self._warm_up(((1, 2.0), (2, 2.0), (1, 1.0)),
                          lambda jobs, grid, cfg: maskgit_batch(self.model, jobs, grid, steps=1, cfg_scale=cfg,
                                                                compile=True))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _run(self, items: list[dict]) -> list:
        key = lambda it: (it["grid"], it["steps"], it["cfg_scale"], it["cfg_schedule"], it["temperature"],  # noqa: E731
                          it["top_k"], it["choice_temperature"])
        return await self._run_groups(items, key, self._compute)

    def _compute(self, group: list[dict]) -> list[dict]:
        it = group[0]
        jobs = [self._job(g) for g in group]
        tokens = maskgit_batch(self.model, jobs, it["grid"], steps=it["steps"], temperature=it["temperature"],
                               top_k=it["top_k"], choice_temperature=it["choice_temperature"],
                               cfg_scale=it["cfg_scale"], cfg_schedule=it["cfg_schedule"], schedule=MASKGIT_SCHEDULE,
                               compile=self.compile)
        return [{"tokens": t.cpu()} for t in tokens]


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30)
class ARModel(_Replica):
    """A causal generator: writes the first k tokens in raster order with a KV cache."""

    def __init__(self, path: str, device: str = "auto", threads: int = 1, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.005, compile: bool = False):
        self._setup(device, threads, max_batch_size, batch_wait_timeout_s)
        self._load_generator(path, compile)
        if not self.model.config.causal:
            raise ValueError(f"{path} is not a causal (AR) model")
        if compile:  # 2, 4 (the symbolic batch), 18 (linear takes another path past 16 rows) and 1 rows
            self._warm_up(((1, 2.0), (2, 2.0), (9, 2.0), (1, 1.0)),
                          lambda jobs, grid, cfg: ar_batch(self.model, jobs, grid, 2, cfg_scale=cfg, compile=True))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _run(self, items: list[dict]) -> list:
        key = lambda it: (it["grid"], it["ar_tokens"], it["cfg_scale"], it["cfg_schedule"], it["temperature"],  # noqa: E731
                          it["top_k"])
        return await self._run_groups(items, key, self._compute)

    def _compute(self, group: list[dict]) -> list[dict]:
        it = group[0]
        jobs = [self._job(g) for g in group]
        tokens = ar_batch(self.model, jobs, it["grid"], it["ar_tokens"], cfg_scale=it["cfg_scale"],
                          cfg_schedule=it["cfg_schedule"], temperature=it["temperature"], top_k=it["top_k"],
                          compile=self.compile)
        # The generator state travels with the tokens so MAR continues the same random stream.
        return [{"tokens": t.cpu(), "generator_state": j.generator.get_state()} for t, j in zip(tokens, jobs)]


class TokenDecoder:
    """Tokens -> PNG bytes. Decodes each request's rows on their own: the conv decoder is not
    batch-invariant to the last bit, and a request must get the same pixels whatever it shares a
    batch with."""

    def __init__(self, path: str, device: torch.device):
        from maskgil.tokenizers import load_tokenizer

        self.device = device
        self.tokenizer = load_tokenizer(path, map_location=device)
        self.info = {**_model_info(path, self.tokenizer, device, tokenizer=True),
                     "codebook_size": self.tokenizer.codebook_size, "downsample": self.tokenizer.downsample}

    def decode(self, item: dict) -> dict:
        codes = item["tokens"].view(-1, *item["grid"])  # (n, h, w)
        images = to_uint8_nhwc(self.tokenizer.decode(codes))  # (n, H, W, 3)
        out = {"pngs": [png_bytes(im) for im in images] if item["want_each"] else []}
        out["grid_png"] = png_bytes(image_grid(images)) if item["want_grid"] else None
        return out


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30)
class Decoder(_Replica):
    """The tokenizer's decoder as its own deployment (own replicas / GPU, batched calls)."""

    def __init__(self, path: str, device: str = "auto", threads: int = 1, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.005):
        self._setup(device, threads, max_batch_size, batch_wait_timeout_s)
        self.decoder = TokenDecoder(path, self.device)
        self._info = self.decoder.info

    def _probe_item(self) -> dict:
        """Codes 0 on a small grid: any working decoder turns them into an image."""
        return {"tokens": torch.zeros(1, 4, dtype=torch.long), "grid": (2, 2), "num_images": 1, "want_each": False,
                "want_grid": False}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _run(self, items: list[dict]) -> list:
        return await self._run_groups(items, lambda it: it["grid"], lambda group: [self.decoder.decode(g) for g in group])


# ----------------------------------------------------------------------------- ingress
api = FastAPI(title="MaskGIL", version="0.1.0",
              description="Class- or text-conditional image generation: MaskGIL (masked), LlamaGen-style AR, and "
                          "AR->MAR fusion, served by Ray Serve. Every response carries the seed that reproduces it.")


@api.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    """422 naming the fields, as FastAPI's own handler, but always renderable: that one echoes the
    input as is, and NaN, Infinity (1e400 too) or a lone surrogate in it made it a bare 500."""
    detail = json_safe(jsonable_encoder(exc.errors()))
    body = json.dumps({"detail": detail}, separators=(",", ":"))  # ASCII: a lone surrogate goes out escaped
    return Response(body, status_code=422, media_type="application/json")


def _stage_timing(t0: float, out: dict) -> dict:
    """Wall time seen by the ingress (queueing included), the replica's batch compute time and batch size."""
    return {"wall_ms": round((time.perf_counter() - t0) * 1e3, 2), "compute_ms": round(out["compute_ms"], 2),
            "batch_requests": out["batch"]["requests"], "batch_rows": out["batch"]["rows"]}


class StageError(Exception):
    """A stage failed in a way the caller should see as an HTTP status (503 / 504 / 500)."""

    def __init__(self, status: int, msg: str):
        super().__init__(msg)
        self.status = status


@serve.deployment(max_ongoing_requests=64, max_queued_requests=64, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Fusion:
    """Validates requests, picks the seed and composes AR -> MAR -> decoder through handles."""

    def __init__(self, ar: DeploymentHandle, mar: DeploymentHandle, decoder: DeploymentHandle | None,
                 shape: dict, limits: dict, request_timeout_s: float = 120.0, tokenizer_path: str | None = None,
                 threads: int = 1, text: dict | None = None):
        self.ar, self.mar, self.decoder = ar, mar, decoder
        self.shape = ModelShape(**shape)
        self.limits = Limits(**limits)
        self.timeout = request_timeout_s
        self.local_decoder = self.text_encoder = None
        if decoder is None or text:
            torch.set_num_threads(threads)
        if decoder is None:  # decoder placement "ingress": decode in this replica, in a worker thread
            self.local_decoder = TokenDecoder(tokenizer_path, torch.device("cpu"))
        if text:  # prompts are encoded once, here, and both model stages get the same features
            from maskgil.text import TextEncoder

            self.text_encoder = TextEncoder(text["encoder"], max_len=text["text_len"])
            if self.text_encoder.dim != text["text_dim"]:
                raise ValueError(f"text encoder {text['encoder']!r} gives {self.text_encoder.dim}-d features, the "
                                 f"models expect {text['text_dim']}")

    async def _stage(self, name: str, handle: DeploymentHandle, item: dict, retries: int = 1) -> dict:
        """Call a model deployment with a deadline. A replica that dies mid-request is retried once
        (same seed -> same result); overload -> 503; deadline -> 504; model error -> 500."""
        for attempt in range(retries + 1):
            response = handle.remote(item)
            try:
                return await asyncio.wait_for(response, self.timeout)
            except asyncio.TimeoutError:
                response.cancel()
                raise StageError(504, f"{name} stage did not answer within {self.timeout:g} s")
            except BackPressureError:
                raise StageError(503, f"{name} deployment is at capacity (queue full); retry later")
            except (RayActorError, DeploymentUnavailableError) as e:
                if attempt == retries:
                    raise StageError(503, f"{name} replica unavailable ({type(e).__name__}); retry later")
        raise AssertionError("unreachable")

    @api.post("/generate", responses={200: {"content": {"image/png": {}, "application/json": {}}},
                                      422: {"description": "invalid request; `detail[].loc` names the field"},
                                      503: {"description": "over capacity or a replica is unavailable"},
                                      504: {"description": "a stage missed its deadline"}})
    async def generate(self, req: GenerateRequest):
        """Generate `num_images` images of `class_id` (or of `prompt` for text-conditional models); png
        (a grid for several) or json."""
        t_start = time.perf_counter()
        try:
            plan = check_request(req, self.limits, self.shape)
        except RequestError as e:
            raise RequestValidationError(e.detail())
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        N, k = plan.n_tokens, plan.ar_tokens
        item = {"class_id": req.class_id, "num_images": req.num_images, "grid": plan.grid, "seed": seed,
                "cfg_scale": req.cfg_scale, "cfg_schedule": req.cfg_schedule, "temperature": req.temperature,
                "top_k": req.top_k, "steps": req.steps, "choice_temperature": req.choice_temperature, "ar_tokens": k}
        timings: dict[str, Any] = {}
        try:
            if self.text_encoder is not None:
                t0 = time.perf_counter()
                feats, mask = await asyncio.to_thread(self.text_encoder.encode, [req.prompt],
                                                      self.text_encoder.max_len)  # pad to text_len
                item.update(text=feats[0], text_mask=mask[0])
                timings["text"] = {"wall_ms": round((time.perf_counter() - t0) * 1e3, 2),
                                   "word_pieces": int(mask.sum())}
            tokens = None
            if k > 0:
                t0 = time.perf_counter()
                out = await self._stage("AR", self.ar, item)
                timings["ar"] = _stage_timing(t0, out)
                tokens = out["tokens"]
            if k < N:
                if tokens is not None:
                    init = torch.full((req.num_images, N), self.shape.vocab_size, dtype=torch.long)  # mask id
                    init[:, :k] = tokens
                    item = {**item, "init_tokens": init, "generator_state": out["generator_state"]}
                t0 = time.perf_counter()
                out = await self._stage("MAR", self.mar, item)
                timings["mar"] = _stage_timing(t0, out)
                tokens = out["tokens"]
            dec_item = {"tokens": tokens, "grid": plan.grid, "want_each": req.output == "json",
                        "want_grid": req.output == "png", "num_images": req.num_images}
            t0 = time.perf_counter()
            if self.local_decoder is not None:
                images = await asyncio.to_thread(self.local_decoder.decode, dec_item)
                timings["decode"] = {"wall_ms": round((time.perf_counter() - t0) * 1e3, 2)}
            else:
                images = await self._stage("decoder", self.decoder, dec_item)
                timings["decode"] = _stage_timing(t0, images)
        except StageError as e:
            return JSONResponse({"detail": str(e), "seed": seed}, status_code=e.status)
        except Exception as e:  # noqa: BLE001 - a model error: 500 naming it, the server stays up
            return JSONResponse({"detail": f"generation failed: {type(e).__name__}: {e}", "seed": seed},
                                status_code=500)
        timings["total_ms"] = round((time.perf_counter() - t_start) * 1e3, 2)
        h, w = plan.grid
        d = self.shape.downsample
        if req.output == "png":
            return Response(images["grid_png"], media_type="image/png",
                            headers={"X-Seed": str(seed), "X-AR-Tokens": str(k), "X-Timings": json.dumps(timings)})
        return {"seed": seed, "class_id": req.class_id, "prompt": req.prompt, "ar_tokens": k,
                "mar_steps": plan.mar_steps, "grid": [h, w], "resolution": [h * d, w * d],
                "images": [base64.b64encode(p).decode("ascii") for p in images["pngs"]],
                "tokens": tokens.view(req.num_images, N).tolist(), "timings": timings}

    @api.get("/healthz")
    async def healthz(self):
        """200 when every deployment answers within 5 s, else 503 naming the ones that did not."""
        stages = {"ar": self.ar, "mar": self.mar}
        if self.decoder is not None:
            stages["decoder"] = self.decoder
        results = await asyncio.gather(*(asyncio.wait_for(h.info.remote(), 5.0) for h in stages.values()),
                                       return_exceptions=True)
        status = {n: ("ok" if not isinstance(r, BaseException) else f"{type(r).__name__}") for n, r in zip(stages, results)}
        if self.decoder is None:
            status["decoder"] = "ok (in ingress)"
        healthy = all(s.startswith("ok") for s in status.values())
        return JSONResponse({"status": "ok" if healthy else "unhealthy", "deployments": status},
                            status_code=200 if healthy else 503)

    @api.get("/models")
    async def models(self):
        """What is loaded: checkpoints (path, config, parameter count, weights hash), tokenizer, limits."""
        ar, mar = await asyncio.gather(self.ar.info.remote(), self.mar.info.remote())
        tok = self.local_decoder.info if self.decoder is None else await self.decoder.info.remote()
        enc = self.text_encoder
        text = None if enc is None else {"encoder": enc.name, "text_len": enc.max_len, "dim": enc.dim}
        return {"ar": ar, "mar": mar, "tokenizer": tok, "cond": self.shape.cond, "text_encoder": text,
                "num_classes": self.shape.num_classes,
                "codebook_size": self.shape.vocab_size, "native_resolution": [g * self.shape.downsample for g in self.shape.native_grid],
                "limits": self.limits.model_dump(), "decoder_placement": "ingress" if self.decoder is None else "deployment"}


# ----------------------------------------------------------------------------- builder
def resolve_checkpoint(role: str, given: str | None) -> str:
    """Argument, else environment variable, else the quickstart's default; absolute and checked."""
    path = given or os.environ.get(ENV[role]) or QUICKSTART[role]
    p = Path(path).expanduser().resolve()
    if not (p / "config.json").is_file():
        how = "given" if given else (f"from ${ENV[role]}" if os.environ.get(ENV[role]) else "the quickstart default")
        raise FileNotFoundError(
            f"no {role} checkpoint at {p} ({how}). Run the quickstart first to create runs/quickstart/, or pass "
            f"`serve run maskgil.serve:app {role}=<checkpoint dir>` / set {ENV[role]}.")
    return str(p)


def _meta_model(path: str):
    """Instantiate a checkpoint's class on the meta device: its shape without loading weights."""
    import maskgil.models  # noqa: F401 - registers generators
    import maskgil.tokenizers  # noqa: F401 - registers tokenizers

    meta = read_config(path)
    cls = MODEL_REGISTRY.get(meta.get("model_type"))
    if cls is None:
        raise ValueError(f"{path}: unknown model_type {meta.get('model_type')!r}")
    with torch.device("meta"):
        return cls(config_from_dict(cls.config_class, meta["config"]))


def model_shape(mar: str, ar: str, tokenizer: str) -> ModelShape:
    """Check that the three checkpoints fit together and return what request checks need."""
    m, a, t = _meta_model(mar), _meta_model(ar), _meta_model(tokenizer)
    if getattr(m, "mask_token_id", None) is None:
        raise ValueError(f"mar={mar} is not a masked model")
    if not getattr(getattr(a, "config", None), "causal", False):
        raise ValueError(f"ar={ar} is not a causal (AR) model")
    if not hasattr(t, "decode"):
        raise ValueError(f"tokenizer={tokenizer} is not a tokenizer")
    if not (m.config.vocab_size == a.config.vocab_size == t.codebook_size):
        raise ValueError(f"vocabularies differ: MAR {m.config.vocab_size}, AR {a.config.vocab_size}, "
                         f"tokenizer codebook {t.codebook_size}; all three must share one tokenizer")
    cond = getattr(m.config, "cond", "class")
    if cond == "class" and m.config.num_classes != a.config.num_classes:
        raise ValueError(f"class counts differ: MAR {m.config.num_classes}, AR {a.config.num_classes}")
    for f in ("cond", "text_dim", "text_len", "text_encoder"):
        if getattr(m.config, f, None) != getattr(a.config, f, None):
            raise ValueError(f"MAR and AR disagree on {f}: {getattr(m.config, f, None)!r} vs "
                             f"{getattr(a.config, f, None)!r}; fusion needs one condition for both")
    if m.mask_token_id != m.config.vocab_size:
        raise ValueError(f"unexpected mask id {m.mask_token_id} (expected vocab size {m.config.vocab_size})")
    return ModelShape(num_classes=m.config.num_classes, vocab_size=m.config.vocab_size, downsample=t.downsample,
                      native_grid=tuple(m.config.grid_size), cond=cond)


def app(args: ServeArgs) -> Application:
    """Application builder: `serve run maskgil.serve:app [mar=DIR ar=DIR tokenizer=DIR ...]`."""
    if isinstance(args, dict):  # called from Python with a plain dict
        args = ServeArgs.model_validate(args)
    mar, ar, tok = (resolve_checkpoint(r, getattr(args, r)) for r in ("mar", "ar", "tokenizer"))
    shape = model_shape(mar, ar, tok)
    text = None
    if shape.cond == "text":
        from maskgil.text import DEFAULT_TEXT_ENCODER

        c = _meta_model(mar).config
        text = {"encoder": c.text_encoder or DEFAULT_TEXT_ENCODER, "text_len": c.text_len, "text_dim": c.text_dim}
    threads = max(1, round(args.num_cpus))
    replica = dict(device=args.device, threads=threads, max_batch_size=args.max_batch_size,
                   batch_wait_timeout_s=args.batch_wait_timeout_s)
    opts = dict(ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
                max_ongoing_requests=max(args.max_ongoing_requests, 2 * args.max_batch_size),
                autoscaling_config={"min_replicas": 1, "max_replicas": args.max_replicas,
                                    "target_ongoing_requests": max(2, args.max_batch_size)})
    ar_app = ARModel.options(**opts).bind(ar, **replica, compile=args.compile)
    mar_app = MARModel.options(**opts).bind(mar, **replica, compile=args.compile)
    dec_app = Decoder.options(**opts).bind(tok, **replica) if args.decoder == "deployment" else None
    ingress = Fusion.options(max_ongoing_requests=args.max_ongoing_requests,
                             max_queued_requests=args.max_queued_requests)
    return ingress.bind(ar_app, mar_app, dec_app, shape=dataclasses.asdict(shape), limits=args.limits.model_dump(),
                        request_timeout_s=args.request_timeout_s, tokenizer_path=tok, threads=threads, text=text)
