"""Serving without a cluster: request schema and limits, checkpoint resolution, the app builder,
the Serve config files, replica health, and the ingress over HTTP (TestClient, replicas in-process)."""
import asyncio
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from pydantic import ValidationError

from maskgil.checkpoint import save_pretrained
from maskgil.models import build_model
from maskgil.sampling import sample_maskgit
from maskgil.serving.api import GenerateRequest, Limits, ModelShape, RequestError, check_request, maskgit_steps_run
from maskgil.tokenizers import build_tokenizer
from maskgil.training import cpu_compile_available

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ModelShape(num_classes=16, vocab_size=512, downsample=8, native_grid=(8, 8))
SMALL = dict(n_layers=1, n_heads=2, dim=32)


def req(**kw):
    return GenerateRequest.model_validate({"class_id": 1, **kw})


def bad_field(body) -> str:
    with pytest.raises(ValidationError) as e:
        GenerateRequest.model_validate(body)
    return e.value.errors()[0]["loc"][0]


def test_schema_defaults_and_types():
    r = req()
    assert (r.cfg_scale, r.steps, r.ar_share, r.num_images, r.seed, r.output) == (2.0, 8, 0.0, 1, None, "png")
    assert bad_field({"class_id": "3"}) == "class_id"  # strict ints: no coercion from strings,
    assert bad_field({"class_id": 3.0}) == "class_id"  # floats
    assert bad_field({"class_id": True}) == "class_id"  # or booleans
    assert bad_field({"class_id": -1}) == "class_id"
    assert bad_field({"class_id": 1, "steps": 0}) == "steps"
    assert bad_field({"class_id": 1, "ar_share": 1.01}) == "ar_share"
    assert bad_field({"class_id": 1, "cfg_scale": float("nan")}) == "cfg_scale"
    assert bad_field({"class_id": 1, "temperature": 0}) == "temperature"
    assert bad_field({"class_id": 1, "seed": 2**63}) == "seed"
    assert bad_field({"class_id": 1, "output": "gif"}) == "output"
    assert bad_field({"class_id": 1, "colour": "red"}) == "colour"  # unknown fields are named, not ignored
    assert req(resolution=[64, 32]).resolution == (64, 32)
    assert bad_field({"prompt": 3}) == "prompt"  # strict strings
    assert bad_field({"prompt": ""}) == "prompt"
    for field in ("cfg_scale", "ar_share", "temperature", "choice_temperature"):  # strict floats: no strings
        assert bad_field({"class_id": 1, field: "1.0"}) == field
        assert bad_field({"class_id": 1, field: True}) == field  # or booleans (true was ar_share 1: pure AR)
        value = getattr(req(**{field: 1}), field)  # but an integer is a number
        assert value == 1.0 and type(value) is float


def test_condition_must_match_the_deployed_models():
    """class_id for class-conditional deployments, prompt for text-conditional ones; the other is refused."""
    text = ModelShape(num_classes=1000, vocab_size=512, downsample=8, native_grid=(8, 8), cond="text")
    lim = Limits(max_prompt_chars=20)
    cases = [({}, SHAPE, "class_id"), ({"prompt": "a red circle"}, SHAPE, "prompt"),
             ({"class_id": 1}, text, "class_id"), ({}, text, "prompt"), ({"prompt": "   "}, text, "prompt"),
             ({"prompt": "x" * 21}, text, "prompt")]
    for body, shape, field in cases:
        with pytest.raises(RequestError) as e:
            check_request(GenerateRequest.model_validate(body), lim, shape)
        assert e.value.field == field, body
    assert check_request(GenerateRequest.model_validate({"prompt": "a red circle"}), lim, text).grid == (8, 8)


def test_limits_and_model_checks():
    lim = Limits(max_num_images=4, max_steps=16, max_cfg_scale=10, max_resolution=96)
    cases = [(dict(class_id=16), "class_id"), (dict(steps=17), "steps"), (dict(cfg_scale=10.5), "cfg_scale"),
             (dict(num_images=5), "num_images"), (dict(top_k=513), "top_k"), (dict(resolution=60), "resolution"),
             (dict(resolution=[64, 104]), "resolution"), (dict(temperature=11.0), "temperature")]
    for kw, field in cases:
        with pytest.raises(RequestError) as e:
            check_request(req(**kw), lim, SHAPE)
        assert e.value.field == field and e.value.detail()[0]["loc"] == ["body", field]
    # Inside the limits: grid = resolution / downsample, k = round-half-up(ar_share * h * w).
    p = check_request(req(resolution=[96, 48], ar_share=0.5), lim, SHAPE)
    assert p.grid == (12, 6) and p.ar_tokens == 36 and p.mar_steps == 8
    assert check_request(req(ar_share=1 / 128), lim, SHAPE).ar_tokens == 1  # 0.5 rounds up
    assert check_request(req(ar_share=1.0), lim, SHAPE).ar_tokens == 64
    assert check_request(req(), Limits(), SHAPE).grid == (8, 8)  # default: native size
    with pytest.raises(RequestError):  # default max_resolution: twice the native 64 px
        check_request(req(resolution=136), Limits(), SHAPE)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_api")
    torch.manual_seed(0)
    save_pretrained(build_model("maskgil-tiny", **SMALL), d / "maskgil")
    save_pretrained(build_model("llamagen-tiny", **SMALL), d / "llamagen")
    save_pretrained(build_model("llamagen-tiny", vocab_size=256, **SMALL), d / "llamagen256")
    for name, preset in (("maskgil_t2i", "maskgil-tiny"), ("llamagen_t2i", "llamagen-tiny")):
        save_pretrained(build_model(preset, cond="text", text_dim=384, text_len=24, **SMALL), d / name)
    build_tokenizer("llamagen-vq-tiny").save_pretrained(d / "tokenizer")
    return d


def test_checkpoint_resolution(ckpts, tmp_path, monkeypatch):
    from maskgil.serve import app, resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    for var in ("MASKGIL_MAR", "MASKGIL_AR", "MASKGIL_TOKENIZER"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(FileNotFoundError, match="quickstart"):
        app({})
    # the quickstart layout relative to the working directory is the default
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(ckpts, target_is_directory=True)
    (ckpts / "maskgil").rename(ckpts / "maskgil_")
    try:
        with pytest.raises(FileNotFoundError, match="mar checkpoint"):
            resolve_checkpoint("mar", None)
    finally:
        (ckpts / "maskgil_").rename(ckpts / "maskgil")
    assert resolve_checkpoint("mar", None) == str((tmp_path / "runs/quickstart/maskgil").resolve())
    monkeypatch.setenv("MASKGIL_AR", str(ckpts / "llamagen256"))  # env beats the default
    assert resolve_checkpoint("ar", None) == str(ckpts / "llamagen256")
    assert resolve_checkpoint("ar", str(ckpts / "llamagen")) == str(ckpts / "llamagen")  # argument beats env


def test_builder_checks_compatibility(ckpts):
    from ray.serve import Application

    from maskgil.serve import app, model_shape

    shape = model_shape(str(ckpts / "maskgil"), str(ckpts / "llamagen"), str(ckpts / "tokenizer"))
    assert shape == ModelShape(num_classes=16, vocab_size=512, downsample=8, native_grid=(8, 8))
    with pytest.raises(ValueError, match="vocabularies differ"):
        app({"mar": str(ckpts / "maskgil"), "ar": str(ckpts / "llamagen256"), "tokenizer": str(ckpts / "tokenizer")})
    with pytest.raises(ValueError, match="not a masked model"):
        app({"mar": str(ckpts / "llamagen"), "ar": str(ckpts / "llamagen"), "tokenizer": str(ckpts / "tokenizer")})
    with pytest.raises(ValidationError):
        app({"mar": str(ckpts / "maskgil"), "max_batch_size": 0})
    built = app({"mar": str(ckpts / "maskgil"), "ar": str(ckpts / "llamagen"), "tokenizer": str(ckpts / "tokenizer")})
    assert isinstance(built, Application)
    text = model_shape(str(ckpts / "maskgil_t2i"), str(ckpts / "llamagen_t2i"), str(ckpts / "tokenizer"))
    assert text.cond == "text"
    with pytest.raises(ValueError, match="disagree on cond"):  # fusion needs one kind of condition
        model_shape(str(ckpts / "maskgil_t2i"), str(ckpts / "llamagen"), str(ckpts / "tokenizer"))


@pytest.mark.parametrize("name", ["serve.yaml", "serve_gpu.yaml"])
def test_serve_config_files(name, ckpts):
    """The config validates against Serve's own schema, binds to loopback, and its args build the app."""
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from maskgil.serve import ServeArgs, app

    raw = yaml.safe_load((ROOT / "ray_configs" / name).read_text())
    cfg = ServeDeploySchema.model_validate(raw)
    assert cfg.http_options.host == "127.0.0.1"
    (a,) = cfg.applications
    assert a.import_path == "maskgil.serve:app"
    args = ServeArgs.model_validate(a.args)  # every key is a builder argument (extra keys are refused)
    assert {d["name"] if isinstance(d, dict) else d.name for d in a.deployments} <= {"ARModel", "MARModel", "Decoder",
                                                                                     "Fusion"}
    paths = {"mar": str(ckpts / "maskgil"), "ar": str(ckpts / "llamagen"), "tokenizer": str(ckpts / "tokenizer")}
    assert isinstance(app(args.model_copy(update=paths)), Application)


@pytest.mark.skipif(not cpu_compile_available(), reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_replicas_with_compile(ckpts):
    """Serve's `compile`: AR and MAR replicas compile at start, and their batches write the tokens
    of eager replicas (greedy, so float noise cannot flip a draw)."""
    from maskgil.serve import ARModel, MARModel

    base = {"grid": (8, 8), "cfg_scale": 2.0, "cfg_schedule": "constant", "temperature": 1.0, "top_k": 1}
    group = [{**base, "class_id": c, "num_images": n, "seed": s, "ar_tokens": 32, "steps": 8, "choice_temperature": 4.5}
             for c, n, s in ((3, 2, 1), (9, 1, 2))]
    for cls, name in ((ARModel, "llamagen"), (MARModel, "maskgil")):
        eager, compiled = (cls.func_or_class(str(ckpts / name), device="cpu", compile=c) for c in (False, True))
        assert compiled.model.__dict__.get("_compiled_methods")  # built in the constructor
        assert compiled._info["compiled"] and not eager._info["compiled"]
        for want, got in zip(eager._compute(group), compiled._compute(group), strict=True):
            assert torch.equal(got["tokens"], want["tokens"]), name


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Real MAR and AR replicas built in-process (no Serve), by kind. Output, class embedding and
    attention weights are scaled up: random tiny weights give near-uniform logits and attention,
    whose draws temperature, top-k, guidance and token positions (the grid) hardly change."""
    from maskgil.serve import ARModel, MARModel

    d = tmp_path_factory.mktemp("sharp")
    torch.manual_seed(0)
    for name, preset in (("mar", "maskgil-tiny"), ("ar", "llamagen-tiny")):
        model = build_model(preset, **SMALL)
        with torch.no_grad():
            model.output.weight.mul_(30.0)
            model.cls_embedding.embedding_table.weight.mul_(3.0)
            for layer in model.layers:
                layer.attention.wqkv.weight.mul_(10.0)
        save_pretrained(model, d / name)
    return {"mar": MARModel.func_or_class(str(d / "mar"), device="cpu"),
            "ar": ARModel.func_or_class(str(d / "ar"), device="cpu")}


BATCH_BASE = {"num_images": 1, "class_id": 3, "seed": 5, "grid": (8, 8), "cfg_scale": 4.0, "cfg_schedule": "constant",
              "temperature": 1.0, "top_k": None, "steps": 4, "choice_temperature": 4.5, "ar_tokens": 16}
# Each setting that changes what a request samples, per replica kind, and another value for it.
BATCH_KEY_CHANGES = [("mar", "grid", (4, 6)), ("mar", "steps", 5), ("mar", "cfg_scale", 1.0),
                     ("mar", "cfg_schedule", "linear"), ("mar", "temperature", 0.3), ("mar", "top_k", 2),
                     ("mar", "choice_temperature", 0.0),
                     ("ar", "grid", (16, 4)), ("ar", "ar_tokens", 12), ("ar", "cfg_scale", 1.0),
                     ("ar", "cfg_schedule", "linear"), ("ar", "temperature", 0.3), ("ar", "top_k", 2)]


@pytest.mark.parametrize("kind,field,value", BATCH_KEY_CHANGES, ids=[f"{k}-{f}" for k, f, _ in BATCH_KEY_CHANGES])
def test_requests_differing_in_one_setting_get_their_own_settings_in_a_batch(replicas, kind, field, value):
    """A replica batch runs each group with its first request's settings, so every setting that
    changes the tokens must be part of the grouping key: requests differing in that one setting,
    arriving in one batch (in either order), each get exactly the tokens they get alone, while
    requests with the same settings (other class and seed) do share a group."""
    replica = replicas[kind]
    run = type(replica)._run.__wrapped__  # the batch method without Serve's queue: a list in, a list out
    a, b = dict(BATCH_BASE), {**BATCH_BASE, field: value, "seed": 6}
    c = {**BATCH_BASE, "class_id": 7, "seed": 8}  # a's settings
    alone = {id(it): asyncio.run(run(replica, [it]))[0][1]["tokens"] for it in (a, b, c)}
    for batch in ([a, b, c], [b, c, a]):
        out = asyncio.run(run(replica, batch))
        assert all(ok for ok, _ in out), out
        assert all(torch.equal(res["tokens"], alone[id(it)]) for it, (_, res) in zip(batch, out)), (kind, field)
        assert [res["batch"]["requests"] for _, res in out] == [1 if it is b else 2 for it in batch]


class FakeResponse:
    """Stands in for a DeploymentResponse: awaitable, cancellable."""

    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def __await__(self):
        if asyncio.iscoroutine(self.outcome):  # an answer computed when awaited
            return (yield from self.outcome.__await__())
        if self.outcome == "hang":
            yield from asyncio.sleep(3600).__await__()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    def __init__(self, *outcomes):
        self.outcomes, self.responses = list(outcomes), []

    def remote(self, item):
        self.responses.append(FakeResponse(self.outcomes.pop(0)))
        return self.responses[-1]


def test_stage_error_mapping():
    """The ingress never waits past its deadline, retries a dead replica once, maps overload to 503."""
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from maskgil.serve import Fusion, StageError

    stage = Fusion.func_or_class._stage
    me = SimpleNamespace(timeout=0.2)
    run = lambda h: asyncio.run(stage(me, "MAR", h, {}))  # noqa: E731

    assert run(FakeHandle({"tokens": 1})) == {"tokens": 1}
    h = FakeHandle(ActorDiedError(), {"tokens": 2})  # replica died: retried once, same item
    assert run(h) == {"tokens": 2} and len(h.responses) == 2
    for outcomes, status, words in [((ActorDiedError(), ActorDiedError()), 503, "MAR replica unavailable"),
                                    ((BackPressureError(num_queued_requests=9, max_queued_requests=8),), 503, "capacity"),
                                    (("hang",), 504, "within 0.2 s")]:
        h = FakeHandle(*outcomes)
        t0 = time.time()
        with pytest.raises(StageError) as e:
            run(h)
        assert e.value.status == status and words in str(e.value)
        assert time.time() - t0 < 2
    assert h.responses[-1].cancelled  # the timed-out call is cancelled, not left running
    with pytest.raises(ValueError):  # a model error propagates (the endpoint turns it into a 500)
        run(FakeHandle(ValueError("boom")))


def test_replica_health_fails_after_repeated_batch_failures():
    """Batches are grouped by key, results come back per request in order, and a replica whose
    batches keep failing, a known-good request's too, reports itself unhealthy (so Serve replaces
    it); one success resets it. Failures of bad requests alone do not."""
    from maskgil.serve import MAX_FAILURES_IN_A_ROW, _Replica

    class Doubler(_Replica):
        def __init__(self):
            self.device, self._failures_in_a_row, self.fail = torch.device("cpu"), 0, False

        def compute(self, group):
            if self.fail or any(g["x"] < 0 for g in group):
                raise RuntimeError("CUDA error: an illegal memory access" if self.fail else "negative x")
            return [{"y": 2 * g["x"]} for g in group]

        async def _run(self, item):  # what @serve.batch makes of the batch method: one item in, one out
            (out,) = await self._run_groups([item], lambda it: 0, self.compute)
            return out

        def _probe_item(self):
            return {"x": 1, "num_images": 1}

        def check_health(self):  # run the probe on a loop of its own
            return asyncio.run(_Replica.check_health(self))

    r = Doubler()
    items = [{"x": x, "k": x % 2, "num_images": 1} for x in range(5)]
    out = asyncio.run(r._run_groups(items, lambda it: it["k"], r.compute))
    assert [v["y"] for ok, v in out] == [0, 2, 4, 6, 8]
    assert [v["batch"]["requests"] for ok, v in out] == [3, 2, 3, 2, 3]  # two groups: even and odd x
    r.check_health()
    r.fail = True
    for i in range(MAX_FAILURES_IN_A_ROW):
        r.check_health()  # healthy until the limit is reached
        out = asyncio.run(r._run_groups(items[:1], lambda it: 0, r.compute))
        assert out[0][0] is False and "illegal memory" in str(out[0][1])
    with pytest.raises(RuntimeError, match="batches in a row failed"):
        r.check_health()
    r.fail = False
    asyncio.run(r._run_groups(items[:1], lambda it: 0, r.compute))
    r.check_health()
    for i in range(2 * MAX_FAILURES_IN_A_ROW):  # one client's bad requests fail their batches ...
        out = asyncio.run(r._run_groups([{"x": -1, "num_images": 1}], lambda it: 0, r.compute))
        assert out[0][0] is False and "negative x" in str(out[0][1])
    r.check_health()  # ... but the replica still serves a good one: healthy, and the count starts over
    assert r._failures_in_a_row == 0


def test_matching_preset():
    import dataclasses

    from maskgil.models import preset_config
    from maskgil.serve import matching_preset
    from maskgil.tokenizers import TOKENIZER_PRESETS

    for name in ("maskgil-tiny", "llamagen-tiny", "maskgil-b", "llamagen-xl"):
        cfg = dataclasses.asdict(preset_config(name, vocab_size=1024, num_classes=10))  # vocab/classes are free
        assert matching_preset(cfg) == name
    assert matching_preset(dataclasses.asdict(preset_config("maskgil-b", n_layers=11))) is None
    assert matching_preset(dataclasses.asdict(preset_config("maskgil-b", post_norm=False))) is None
    for name in ("llamagen-vq", "llamagen-vq-tiny", "vqgan-chameleon"):
        assert matching_preset(dataclasses.asdict(TOKENIZER_PRESETS[name][1]), tokenizer=True) == name


def test_maskgit_steps_run_counts_the_steps_the_sampler_runs():
    """The served `mar_steps` is what MaskGIT runs: it stops once nothing is masked, so with 63 of
    64 tokens written by AR, 64 steps asked run 1."""
    torch.manual_seed(0)
    mar = build_model("maskgil-tiny", **SMALL).eval()
    for known, steps in ((63, 64), (60, 8), (32, 8), (0, 8), (0, 64), (61, 2)):
        init = torch.full((1, 64), -1)
        init[:, :known] = 0
        trace = []
        sample_maskgit(mar, torch.tensor([1]), (8, 8), steps=steps, init_tokens=init, trace=trace,
                       generator=torch.Generator().manual_seed(0))
        assert maskgit_steps_run(64 - known, steps) == len(trace), (known, steps)
    assert maskgit_steps_run(0, 8) == 0  # AR wrote every token


class InProcessHandle:
    """Stands in for a DeploymentHandle: each call runs the replica's batch method on that one
    request, in this process (what `_Replica.__call__` does, without Serve's batch queue)."""

    def __init__(self, replica):
        self.replica = replica

    def remote(self, item):
        return FakeResponse(self._answer(item))

    async def _answer(self, item):
        ((ok, value),) = await type(self.replica)._run.__wrapped__(self.replica, [item])
        if not ok:
            raise value
        return value


@contextlib.contextmanager
def ingress_client(ar, mar, decoder):
    """The ingress app over HTTP (FastAPI's TestClient), its stages the given handles."""
    import ray.serve
    from fastapi.testclient import TestClient

    from maskgil.serve import Fusion, api

    ingress = Fusion.func_or_class.__mro__[1]  # the class as written, without Serve's ASGI wrapper
    fusion = ingress(ar, mar, decoder, shape=dataclasses.asdict(SHAPE), limits=Limits().model_dump())
    with pytest.MonkeyPatch.context() as mp:  # the routes find their deployment instance here
        mp.setattr(ray.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=fusion))
        with TestClient(api, raise_server_exceptions=False) as c:
            yield c


@pytest.fixture(scope="module")
def client(ckpts):
    """The ingress app over HTTP, its stages real replicas run in-process."""
    from maskgil.serve import ARModel, Decoder, MARModel, model_shape

    ar, mar, tok = (str(ckpts / n) for n in ("llamagen", "maskgil", "tokenizer"))
    assert model_shape(mar, ar, tok) == SHAPE
    replicas = (ARModel.func_or_class(ar, device="cpu"), MARModel.func_or_class(mar, device="cpu"),
                Decoder.func_or_class(tok, device="cpu"))
    with ingress_client(*map(InProcessHandle, replicas)) as c:
        yield c


def test_http_stage_failures_answer_with_their_status_and_the_seed():
    """A stage that fails answers as JSON naming the failure, with the request's seed (so the caller
    can retry it): a model error is a 500 naming the exception, overload a 503, a dead replica
    (after its retry) a 503; a request without a seed gets the one it was given."""
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    body = {"class_id": 1, "steps": 2, "seed": 123, "output": "json"}
    cases = [(FakeHandle(ValueError("codes out of range")), 500, "generation failed: ValueError: codes out of range"),
             (FakeHandle(BackPressureError(num_queued_requests=9, max_queued_requests=8)), 503,
              "MAR deployment is at capacity (queue full); retry later"),
             (FakeHandle(ActorDiedError(), ActorDiedError()), 503,
              "MAR replica unavailable (ActorDiedError); retry later")]
    for mar, status, detail in cases:
        with ingress_client(FakeHandle(), mar, FakeHandle()) as c:
            r = c.post("/generate", json=body)
        assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
        assert r.json() == {"detail": detail, "seed": 123}
    with ingress_client(FakeHandle(), FakeHandle(RuntimeError("boom")), FakeHandle()) as c:
        r = c.post("/generate", json={"class_id": 1, "steps": 2})
    assert r.status_code == 500 and isinstance(r.json()["seed"], int) and "RuntimeError: boom" in r.json()["detail"]


def strict_json(response):
    """The body parsed as standard JSON (NaN and Infinity are not JSON)."""
    def refuse(name):
        raise ValueError(f"{name} in a JSON body")

    return json.loads(response.text, parse_constant=refuse)


def post_raw(client, body: bytes):
    return client.post("/generate", content=body, headers={"content-type": "application/json"})


def test_http_unrenderable_input_gets_422_naming_the_field(client):
    """NaN, Infinity and numbers too big for a float (Python's JSON parser reads all three) and lone
    surrogates used to crash FastAPI's 422 body, which echoes the input, into a bare 500."""
    cases = [(b'{"class_id":1,"cfg_scale":NaN}', "cfg_scale", "NaN"),
             (b'{"class_id":1,"cfg_scale":Infinity}', "cfg_scale", "Infinity"),
             (b'{"class_id":1,"cfg_scale":1e400}', "cfg_scale", "Infinity"),
             (b'{"class_id":1,"choice_temperature":1e400}', "choice_temperature", "Infinity"),
             (b'{"class_id":1,"steps":NaN}', "steps", "NaN"), (b'{"class_id":NaN}', "class_id", "NaN"),
             (b'{"class_id":1,"seed":-Infinity}', "seed", "-Infinity"),
             (b'{"class_id":1,"resolution":[NaN,64]}', "resolution", ["NaN", 64]),
             (b'{"class_id":"\\ud800"}', "class_id", "\ud800")]
    for body, field, echoed in cases:
        r = post_raw(client, body)
        assert r.status_code == 422 and r.headers["content-type"] == "application/json", (body, r.text)
        errors = strict_json(r)["detail"]
        assert errors[0]["loc"][:2] == ["body", field] and errors[0]["input"] == echoed, (body, errors)
    r = post_raw(client, b'{"class_id":1,"cfg_scale":21}')  # the deployment's own checks answer the same way
    assert r.status_code == 422 and strict_json(r)["detail"][0]["loc"] == ["body", "cfg_scale"]
    assert client.get("/openapi.json").status_code == 200


def test_http_float_fields_are_strict(client):
    """Where a float is due, "1.0" and true are refused (true was ar_share 1.0: pure AR); integers pass."""
    for field in ("cfg_scale", "ar_share", "temperature", "choice_temperature"):
        for value in ("1.0", True):
            r = client.post("/generate", json={"class_id": 1, "steps": 2, field: value})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], (field, value, r.text)
    for ar_share, ar_tokens in ((1, 64), (0, 0)):
        r = client.post("/generate", json={"class_id": 1, "steps": 2, "seed": 0, "cfg_scale": 2, "temperature": 1,
                                           "choice_temperature": 0, "ar_share": ar_share, "output": "json"})
        assert r.status_code == 200 and r.json()["ar_tokens"] == ar_tokens, r.text


def test_http_mar_steps_are_the_steps_run(client):
    """`mar_steps` in a response counts the steps MaskGIT ran, not those asked for: 1 token left, 1 step."""
    cases = (({"ar_share": 0.99, "steps": 64}, 63, 1), ({"ar_share": 0.5, "steps": 4}, 32, 4), ({"steps": 64}, 0, 64),
             ({"ar_share": 1.0, "steps": 4}, 64, 0))
    for body, ar_tokens, mar_steps in cases:
        r = client.post("/generate", json={"class_id": 1, "seed": 0, "output": "json", **body})
        assert r.status_code == 200, r.text
        d = r.json()
        assert (d["ar_tokens"], d["mar_steps"]) == (ar_tokens, mar_steps), body


def test_http_tiny_temperature_samples(client):
    """Any temperature > 0 passes validation, so it must sample, in both stages (1e-40 overflowed
    1 / temperature into a failed batch: a 500, and replicas counting failures)."""
    for ar_share, temperature in ((0.0, 1e-40), (0.5, 1e-40), (1.0, 1e-40), (0.5, 1e-300)):  # 1e-300: 0 in float32
        r = client.post("/generate", json={"class_id": 1, "steps": 2, "seed": 0, "temperature": temperature,
                                           "ar_share": ar_share})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", (ar_share, temperature, r.text)
        assert r.content.startswith(b"\x89PNG")


def test_request_failures_do_not_condemn_a_working_replica(ckpts, monkeypatch):
    """Batches that fail on their own input (out-of-range classes or codes, here sent past the
    ingress's checks) leave each real replica healthy: its known-good probe, through its own batch
    queue, succeeds and the failure count starts over."""
    import ray.serve

    from maskgil.serve import MAX_FAILURES_IN_A_ROW, ARModel, Decoder, MARModel

    config = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))  # read by @serve.batch
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: config)
    for cls, name in ((ARModel, "llamagen"), (MARModel, "maskgil"), (Decoder, "tokenizer")):
        replica = cls.func_or_class(str(ckpts / name), device="cpu")
        probe = replica._probe_item()
        bad = {**probe, "class_id": 99} if "class_id" in probe else {**probe, "tokens": probe["tokens"] + 10**6}

        async def scenario():
            for _ in range(MAX_FAILURES_IN_A_ROW):
                with pytest.raises((ValueError, IndexError, RuntimeError)):
                    await replica(bad)
            assert replica._failures_in_a_row == MAX_FAILURES_IN_A_ROW
            await replica.check_health()
            assert replica._failures_in_a_row == 0

        asyncio.run(scenario())
