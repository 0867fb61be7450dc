"""Pre-tokenization on Ray Data: image source -> decode/crop tasks -> tokenizer actor pool -> token shards.

Data flow (why it is shaped like this):
1. The driver plans input shards from a sorted listing (`sources.plan_shards`); shards already
   complete from an earlier run (same fingerprint) are skipped: that is resume.
2. `decode_shards` (CPU tasks, one input shard per call) reads each input, decodes it in our own
   code and crops it; a bad input becomes a "bad" record (quarantine), never an exception. Each
   shard ends with an "end" record carrying its counts, and the records stream out in small chunks.
3. `TokenizeActor` (a `map_batches` actor pool, a GPU each when there are GPUs) turns pixels into
   token ids; other records pass through.
4. The driver streams the results (`iter_batches`), assembles each shard until its counts are
   met, sorts it by (input index, aug) and writes it atomically. Each shard is written once, by one
   process, from a fixed set of inputs in a fixed order, so the output does not depend on how Ray
   scheduled the work. Only token ids (a few hundred bytes per row) travel to the driver.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import time
from collections import defaultdict
from typing import Any, Callable, Iterator

import numpy as np

from maskgil.data.images import BadImage, DecodeLimits, Preprocess, decode_image
from maskgil.data.shards import SCHEMA_VERSION, TokenShardWriter
from maskgil.data.sources import Columns, InputShard, plan_shards, read_shard

# What a row is conditioned on when --target is not given (parquet: "label" if the files have the
# label column, else "caption").
DEFAULT_TARGET = {"imagenet": "label", "parquet": None, "webdataset": "caption"}


@dataclasses.dataclass
class PretokenizeConfig:
    source: str
    format: str  # imagenet | parquet | webdataset
    out: str
    tokenizer: str  # a tokenizer checkpoint directory (maskgil.tokenizers.load_tokenizer)
    image_size: int = 256
    augment: str = "none"  # none | flip | ten-crop
    crop_range: float = 1.1
    buckets: tuple[tuple[int, int], ...] | None = None  # (w, h) aspect-ratio buckets for caption sets
    target: str | None = None  # label | caption; default by format (webdataset: caption)
    rows_per_shard: int = 1000  # inputs per output shard (imagenet/parquet; webdataset: one shard per tar)
    num_tokenizers: int = 1  # actor pool size
    gpus_per_tokenizer: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_tokenizer: float = 1.0
    # CPUs per decode task. Kept different from cpus_per_tokenizer: Ray Data fuses a task stage into
    # an actor stage with identical resources, and the fused actor then takes `batch_size` whole input
    # shards per call, so no shard reaches the writer until all of them are tokenized.
    decode_cpus: float = 0.5
    batch_size: int = 64  # images per tokenizer call
    chunk_size: int = 32  # records per block out of the decode stage
    min_side: int = 32
    max_pixels: int = 89_478_485
    columns: Columns = dataclasses.field(default_factory=Columns)
    max_new_shards: int | None = None  # stop after writing this many shards (partial runs; resume tests)

    def resolved_target(self) -> str:
        t = self.target or DEFAULT_TARGET[self.format]
        if t is None:
            t = parquet_target(self.source, self.columns)
        if t not in ("label", "caption"):
            raise ValueError(f"target must be 'label' or 'caption', got {t!r}")
        return t

    def preprocess(self) -> Preprocess:
        return Preprocess(self.image_size, self.augment, self.crop_range, self.buckets)

    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.min_side, self.max_pixels)


def parquet_target(uri: str, columns: Columns) -> str:
    """"label" when the Parquet files carry the label column, else "caption" when they carry captions."""
    import pyarrow.parquet as pq

    from maskgil.data.sources import _files, resolve

    fs, root = resolve(uri)
    files = [f for f in _files(fs, root) if f.path.endswith(".parquet")]
    if not files:
        raise ValueError(f"no .parquet files under {uri!r}")
    names = pq.read_schema(files[0].path, filesystem=fs).names
    if columns.label in names:
        return "label"
    if columns.caption in names:
        return "caption"
    raise ValueError(f"{files[0].path}: neither a {columns.label!r} nor a {columns.caption!r} column (columns: {names}); "
                     "name them with --label-column / --caption-column")


# ---------------------------------------------------------------------------------------------
# Stage 1: read + decode + crop (CPU tasks).

_RECORD_COLUMNS = ("shard", "index", "aug", "kind", "source", "label", "caption", "reason", "n_rows", "n_bad", "seen", "height", "width", "pixels")


def _chunk(records: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for c in _RECORD_COLUMNS:
        vals = [r.get(c) for r in records]
        if c in ("kind", "source", "caption", "reason", "pixels"):
            arr = np.empty(len(vals), dtype=object)
            arr[:] = [(b"" if c == "pixels" else "") if v is None else v for v in vals]
        else:
            arr = np.array([-1 if v is None else v for v in vals], dtype=np.int64)
        out[c] = arr
    return out


def label_problem(label, num_classes: int | None = None) -> str | None:
    """Why `label` cannot be a row's class id, or None. Negative labels are refused because
    Hugging Face marks unlabelled rows with -1 (and a negative id indexes no class embedding);
    ids >= `num_classes`, when the source declares its classes, name no class either."""
    if label is None:
        return "no label"
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        return f"label is not an integer: {type(label).__name__}"
    if label < 0:
        return f"negative label {label} (unlabelled)" if label == -1 else f"negative label {label}"
    if num_classes is not None and label >= num_classes:
        return f"label {label} out of range: the source declares {num_classes} classes"
    return None


def caption_problem(caption) -> str | None:
    """Why `caption` cannot be a row's caption, or None: missing or blank (whitespace tokenizes to
    nothing, so the row would be unconditional), or not text (never store a Python repr)."""
    if caption is None:
        return "no caption"
    if not isinstance(caption, str):
        return f"caption is not a string: {type(caption).__name__}"
    if not caption.strip():
        return "no caption"
    return None


def shard_records(shard: InputShard, preprocess: Preprocess, limits: DecodeLimits, target: str,
                  columns: Columns = Columns()) -> Iterator[dict]:
    """Every record of one input shard: "row" (a crop to tokenize), "bad" (quarantine), then one "end"."""
    n_rows = n_bad = seen = 0
    for rec in read_shard(shard, columns):
        seen += 1
        base = {"shard": shard.shard_id, "index": rec.index, "source": rec.source}
        reason = rec.error
        if reason is None and target == "label":
            reason = label_problem(rec.label, rec.num_classes)
        if reason is None and target == "caption":
            reason = caption_problem(rec.caption)
        crops = []
        if reason is None:
            try:
                crops = preprocess(decode_image(rec.data, limits))
            except BadImage as e:
                reason = e.reason
            except Exception as e:  # a crop failing is still this input's problem only
                reason = f"preprocess failed: {type(e).__name__}: {e}"
        if reason is not None:
            n_bad += 1
            yield {**base, "aug": 0, "kind": "bad", "reason": reason}
            continue
        for aug, arr in enumerate(crops):
            n_rows += 1
            yield {**base, "aug": aug, "kind": "row", "label": int(rec.label) if target == "label" else None,
                   "caption": rec.caption if target == "caption" else None,
                   "height": arr.shape[0], "width": arr.shape[1], "pixels": arr.tobytes()}
    yield {"shard": shard.shard_id, "index": -1, "aug": 0, "kind": "end", "source": "", "n_rows": n_rows, "n_bad": n_bad, "seen": seen}


def decode_shards(batch: dict[str, np.ndarray], preprocess: Preprocess, limits: DecodeLimits, target: str,
                  columns: Columns, chunk_size: int) -> Iterator[dict[str, np.ndarray]]:
    """`map_batches` UDF: input rows are {"shard": InputShard json}; yields record chunks."""
    for text in batch["shard"]:
        shard = InputShard.from_json(str(text))
        buf = []
        for rec in shard_records(shard, preprocess, limits, target, columns):
            buf.append(rec)
            if len(buf) >= chunk_size:
                yield _chunk(buf)
                buf = []
        if buf:
            yield _chunk(buf)


# ---------------------------------------------------------------------------------------------
# Stage 2: tokenizer actor.


class TokenizeActor:
    """Holds one tokenizer; turns "row" records' pixels into token ids (bytes of uint16/uint32)."""

    def __init__(self, tokenizer_dir: str, device: str = "cpu", batch_size: int = 64, threads: int = 1):
        import torch

        from maskgil.tokenizers import load_tokenizer

        if device == "cpu":
            torch.set_num_threads(max(1, int(threads)))
        self.device = device
        self.tok = load_tokenizer(tokenizer_dir).to(device).eval()
        self.batch_size = batch_size
        self.dtype = np.uint16 if self.tok.codebook_size <= 65536 else np.uint32

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) -> token ids (n, h, w), in fixed-size sub-batches."""
        import torch

        out = []
        with torch.inference_mode():
            for lo in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[lo:lo + self.batch_size])).to(self.device)
                out.append(self.tok.encode(x).cpu().numpy())
        return np.concatenate(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["kind"])
        tokens = np.empty(n, dtype=object)
        tokens[:] = [b""] * n
        grid_h = np.zeros(n, np.int64)
        grid_w = np.zeros(n, np.int64)
        is_row = np.array([k == "row" for k in batch["kind"]], bool)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in np.nonzero(is_row)[0]:
            groups[(int(batch["height"][i]), int(batch["width"][i]))].append(int(i))
        for (h, w), idx in groups.items():
            images = np.stack([np.frombuffer(batch["pixels"][i], np.uint8).reshape(h, w, 3) for i in idx])
            codes = self.encode(images)
            for j, i in enumerate(idx):
                tokens[i] = codes[j].astype(self.dtype).tobytes()
                grid_h[i], grid_w[i] = codes.shape[1], codes.shape[2]
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out.update(tokens=tokens, grid_h=grid_h, grid_w=grid_w)
        return out


# ---------------------------------------------------------------------------------------------
# Driver side: assemble shards from the stream.


class ShardAssembler:
    """Collects streamed records per shard; a shard is ready when its "end" counts are all in."""

    def __init__(self, target: str, token_dtype=np.uint16):
        self.target = target
        self.token_dtype = token_dtype
        self.rows: dict[int, list] = defaultdict(list)
        self.bad: dict[int, list] = defaultdict(list)
        self.end: dict[int, tuple[int, int, int]] = {}

    def add(self, batch: dict[str, np.ndarray]) -> list[int]:
        touched = set()
        for i, kind in enumerate(batch["kind"]):
            s = int(batch["shard"][i])
            touched.add(s)
            if kind == "row":
                tok = np.frombuffer(batch["tokens"][i], self.token_dtype)
                value = int(batch["label"][i]) if self.target == "label" else str(batch["caption"][i])
                self.rows[s].append((int(batch["index"][i]), int(batch["aug"][i]), str(batch["source"][i]), value,
                                     int(batch["grid_h"][i]), int(batch["grid_w"][i]), tok))
            elif kind == "bad":
                self.bad[s].append((int(batch["index"][i]), str(batch["source"][i]), str(batch["reason"][i])))
            elif kind == "end":
                self.end[s] = (int(batch["n_rows"][i]), int(batch["n_bad"][i]), int(batch["seen"][i]))
            else:
                raise ValueError(f"unknown record kind {kind!r}")
        return sorted(s for s in touched if self.ready(s))

    def ready(self, s: int) -> bool:
        if s not in self.end:
            return False
        n_rows, n_bad, _ = self.end[s]
        return len(self.rows[s]) == n_rows and len(self.bad[s]) == n_bad

    def take(self, s: int) -> tuple[dict[str, Any], list[dict], int]:
        """Pop shard s as (columns sorted by (index, aug), quarantine list sorted by index, seen)."""
        rows = sorted(self.rows.pop(s), key=lambda r: (r[0], r[1]))
        bad = sorted(self.bad.pop(s), key=lambda r: r[0])
        seen = self.end.pop(s)[2]
        cols = {"tokens": [r[6] for r in rows], "grid_h": [r[4] for r in rows], "grid_w": [r[5] for r in rows],
                self.target: [r[3] for r in rows], "source": [r[2] for r in rows], "aug": [r[1] for r in rows]}
        return cols, [{"source": b[1], "reason": b[2]} for b in bad], seen

    @property
    def pending(self) -> int:
        return len(set(self.rows) | set(self.bad) | set(self.end))


# ---------------------------------------------------------------------------------------------
# The whole run.


def tokenizer_info(tokenizer_dir: str) -> dict:
    """Name, weights hash, codebook size and downsample factor of a tokenizer checkpoint directory."""
    from maskgil.checkpoint import read_config, weights_hash
    from maskgil.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    meta = read_config(tokenizer_dir)
    name = meta.get("extra", {}).get("name") or meta.get("config", {}).get("name") or meta.get("model_type")
    return {"name": name, "model_type": meta.get("model_type"), "path": str(tokenizer_dir),
            "weights_sha256": weights_hash(tokenizer_dir), "codebook_size": int(tok.codebook_size),
            "downsample": int(tok.downsample)}


def settings_fingerprint(cfg: PretokenizeConfig, tok: dict) -> str:
    """What, besides the inputs, decides a shard's content: a shard done under other settings is redone."""
    blob = json.dumps({"schema": SCHEMA_VERSION, "tokenizer": tok["weights_sha256"], "pre": dataclasses.asdict(cfg.preprocess()),
                       "limits": dataclasses.asdict(cfg.limits()), "target": cfg.resolved_target(),
                       "columns": dataclasses.asdict(cfg.columns)}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# (cfg, shards to do, target, preprocess) -> (tokenized record batches, tokenizer device)
Stream = Callable[[PretokenizeConfig, list, str, Preprocess], tuple]


def ray_stream(cfg: PretokenizeConfig, todo: list[InputShard], target: str, pre: Preprocess) -> tuple[Iterator[dict[str, np.ndarray]], str]:
    """The tokenized records of the shards in `todo` from a Ray Data pipeline on the connected
    cluster (decode tasks -> tokenizer actor pool), and the tokenizer device."""
    import ray

    gpus = cfg.gpus_per_tokenizer
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    device = "cuda" if gpus else "cpu"
    ds = ray.data.from_items([{"shard": s.to_json()} for s in todo], override_num_blocks=len(todo))
    decode_cpus = cfg.decode_cpus
    if not gpus and decode_cpus == cfg.cpus_per_tokenizer:
        decode_cpus = 0.999 * decode_cpus  # see PretokenizeConfig.decode_cpus: keep the stages apart
    cpus = ray.cluster_resources().get("CPU", 0)
    if cfg.num_tokenizers * cfg.cpus_per_tokenizer + decode_cpus > cpus:
        raise ValueError(f"{cfg.num_tokenizers} tokenizer actors x {cfg.cpus_per_tokenizer} CPU + {decode_cpus} CPU for "
                         f"decoding exceed the cluster's {cpus:g} CPUs and would never be scheduled: "
                         "lower num_tokenizers or cpus_per_tokenizer")
    ds = ds.map_batches(decode_shards, batch_size=1, batch_format="numpy", num_cpus=decode_cpus,
                        fn_kwargs=dict(preprocess=pre, limits=cfg.limits(), target=target, columns=cfg.columns,
                                       chunk_size=cfg.chunk_size))
    ds = ds.map_batches(TokenizeActor, batch_size=cfg.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=cfg.num_tokenizers),
                        num_gpus=gpus, num_cpus=cfg.cpus_per_tokenizer,
                        fn_constructor_kwargs=dict(tokenizer_dir=cfg.tokenizer, device=device,
                                                   batch_size=cfg.batch_size, threads=max(1, round(cfg.cpus_per_tokenizer))))
    return ds.iter_batches(batch_size=None, batch_format="numpy"), device


def local_stream(cfg: PretokenizeConfig, todo: list[InputShard], target: str, pre: Preprocess) -> tuple[Iterator[dict[str, np.ndarray]], str]:
    """The same two stages in this process, without Ray, tokenizing on the CPU: the driver's resume,
    manifest and quarantine logic can then be run and tested on its own."""
    actor = TokenizeActor(cfg.tokenizer, "cpu", cfg.batch_size)

    def batches():
        for s in todo:
            shard = {"shard": np.array([s.to_json()], dtype=object)}
            for chunk in decode_shards(shard, pre, cfg.limits(), target, cfg.columns, cfg.chunk_size):
                yield actor(chunk)

    return batches(), "cpu"


def run_pretokenize(cfg: PretokenizeConfig, progress: bool = True, stream: Stream | None = None) -> dict:
    """Run (or resume) a pretokenize job on the connected Ray cluster; returns the summary.

    `summary["complete"]` is False only when `max_new_shards` stopped the run early. `stream`
    (default `ray_stream`) yields the tokenized records of the shards to do.
    """
    from tqdm import tqdm

    t0 = time.time()
    target = cfg.resolved_target()
    pre = cfg.preprocess()
    tok = tokenizer_info(cfg.tokenizer)
    ds_factor = tok["downsample"]
    sizes = pre.buckets or ((cfg.image_size, cfg.image_size),)
    for w, h in sizes:
        if w % ds_factor or h % ds_factor:
            raise ValueError(f"image size {w}x{h} is not a multiple of the tokenizer's downsample factor {ds_factor}")
    n_tokens = None if pre.buckets else (cfg.image_size // ds_factor) ** 2
    writer = TokenShardWriter(cfg.out, tok["codebook_size"], n_tokens, target)
    writer.remove_stale_temps()
    plan = plan_shards(cfg.source, cfg.format, cfg.rows_per_shard)
    setting = settings_fingerprint(cfg, tok)
    fingerprints = {s.shard_id: f"{setting}-{s.fingerprint()}" for s in plan}
    todo = [s for s in plan if not writer.is_complete(s.shard_id, fingerprints[s.shard_id])]
    skipped = len(plan) - len(todo)
    print(f"pretokenize: {len(plan)} shards planned from {cfg.source} ({cfg.format}); {skipped} already complete, {len(todo)} to do")

    new_recs = []
    device = None
    if todo:
        batches, device = (stream or ray_stream)(cfg, todo, target, pre)
        assembler = ShardAssembler(target, writer.np_dtype)
        bar = tqdm(total=len(todo), desc="shards written", disable=not progress)
        limit = cfg.max_new_shards if cfg.max_new_shards is not None else len(todo)
        for batch in batches:
            for s in assembler.add(batch):
                if len(new_recs) >= limit:
                    break
                if not new_recs:
                    # A shard is about to change: a manifest from an earlier run (other settings, or inputs
                    # since changed) would go on vouching for shards it no longer describes. Gone until
                    # `finalize` writes one for this run's shards.
                    writer.invalidate_manifest()
                cols, quarantine, seen = assembler.take(s)
                new_recs.append({**writer.write(s, fingerprints[s], cols, quarantine, seen), "at_s": time.time() - t0})
                bar.update(1)
            if len(new_recs) >= limit:
                break  # stops the stream; a partial run (or a kill) is finished by rerunning
        del batches  # closes a generator stream now; Ray's pipeline stopped when the loop dropped its iterator
        bar.close()
        if len(new_recs) < limit:
            raise RuntimeError(f"the stream ended with {len(todo) - len(new_recs)} shards unwritten "
                               f"({assembler.pending} partly received): records were lost between the stages")

    elapsed = time.time() - t0
    complete = all(writer.done_record(s.shard_id) is not None and writer.is_complete(s.shard_id, fingerprints[s.shard_id]) for s in plan)
    summary = {
        "complete": complete,
        "shards_planned": len(plan), "shards_skipped": skipped, "shards_written": len(new_recs),
        "rows_written_this_run": sum(r["rows"] for r in new_recs),
        "inputs_seen_this_run": sum(r["seen"] for r in new_recs),
        "inputs_quarantined_this_run": sum(r["quarantined"] for r in new_recs),
        "seconds": elapsed, "tokenizer_device": device,  # None when nothing was left to do
        "images_per_s": sum(r["written_inputs"] for r in new_recs) / max(elapsed, 1e-9),
        "rows_per_s": sum(r["rows"] for r in new_recs) / max(elapsed, 1e-9),
        # Seconds from the start to each shard written: startup cost vs steady rate.
        "shard_written_at_s": [round(r["at_s"], 3) for r in new_recs],
        "shard_inputs_written": [r["written_inputs"] for r in new_recs],
    }
    if complete:
        grid = None if pre.buckets else [cfg.image_size // ds_factor] * 2
        manifest = writer.finalize(len(plan), {
            "tokenizer": {k: tok[k] for k in ("name", "model_type", "weights_sha256", "path", "downsample")},
            "image_size": cfg.image_size, "grid": grid, "buckets": [list(b) for b in pre.buckets] if pre.buckets else None,
            "augment": cfg.augment, "n_aug": pre.n_aug, "crop_range": cfg.crop_range if cfg.augment == "ten-crop" else None,
            "source": {"uri": cfg.source, "format": cfg.format}, "text_embedding": None,
            "settings_fingerprint": setting,
        })
        summary.update({k: manifest[k] for k in ("rows_written", "inputs_seen", "inputs_written", "inputs_quarantined")})
        summary["reconciled"] = manifest["inputs_seen"] == manifest["inputs_written"] + manifest["inputs_quarantined"]
    return summary


def format_summary(s: dict) -> str:
    lines = [f"shards: {s['shards_written']} written, {s['shards_skipped']} already complete, {s['shards_planned']} planned",
             f"this run: {s['rows_written_this_run']} rows from {s['inputs_seen_this_run']} inputs "
             f"({s['inputs_quarantined_this_run']} quarantined) in {s['seconds']:.1f}s = {s['images_per_s']:.1f} images/s"
             + (f", tokenized on {s['tokenizer_device']}" if s.get("tokenizer_device") else "")]
    if s["complete"]:
        ok = "OK" if s["reconciled"] else "MISMATCH"
        lines.append(f"total: seen {s['inputs_seen']} = written {s['inputs_written']} + quarantined {s['inputs_quarantined']} [{ok}]; "
                     f"rows {s['rows_written']}")
    else:
        lines.append("incomplete: rerun the same command to resume")
    return "\n".join(lines)
