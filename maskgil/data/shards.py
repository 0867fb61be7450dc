"""Token shards: the Parquet files pretokenize writes and training reads (DESIGN section 4).

Layout of an output directory (local path or URI):

    manifest.json                  written last, only when every shard is complete and counts reconcile
    quarantine.jsonl               every refused input: {"source", "reason", "shard"}
    shards/shard-000000.parquet    rows of input shard 0, ordered by (input index, aug)
    shards/shard-000000.done.json  completion record: rows, seen, quarantined, fingerprint, bytes
    shards/shard-000000.quarantine.jsonl

Row schema (SCHEMA_VERSION 1):
    tokens          fixed_size_list<uint16>[grid_h*grid_w] (uint32 when the codebook has > 65,536 codes);
                    a variable-length list<...> when aspect-ratio buckets give rows different grids
    grid_h, grid_w  int16, the token grid (row-major flattening)
    label           int32 (class sets)  | caption  string (caption sets)
    source          string, the input's path / file#row / tar/key relative to the source root
    aug             int8, crop index (0 centre; flip: 1 = mirror; ten-crop: 0 centre, 1-4 corners, 5+k mirror of k)
    text_embedding  OPTIONAL fixed_size_list<float16>[D]: a caption's text-encoder embedding, written by
                    a text-encoder actor stage (comes with the text-conditional issue). Absent unless the
                    manifest's "text_embedding" names the encoder {"name", "weights_sha256", "dim", "pooling"}.
                    Storing it beside the tokens lets training skip the encoder; D = 384 for all-MiniLM-L6-v2.

Crash safety: each file is written under a hidden temporary name and renamed into place; the
completion record is written last. A shard without a valid completion record is not complete
(a rerun redoes it), and readers only trust shards listed in manifest.json. A run removes an
existing manifest before it changes any shard (`invalidate_manifest`), and readers check each
listed shard's size against the manifest, so a rerun with other settings that stops part way
cannot leave an old manifest vouching for a mix of old and new shards.
"""
from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from maskgil.data.sources import resolve

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
SHARDS_DIR = "shards"


def token_dtype(codebook_size: int) -> pa.DataType:
    """uint16 holds ids < 65,536; larger codebooks (e.g. LFQ 2^18) need uint32."""
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    return pa.uint16() if codebook_size <= 65536 else pa.uint32()


def token_schema(codebook_size: int, n_tokens: int | None, target: str, text_embed_dim: int | None = None) -> pa.Schema:
    """Arrow schema of a shard. n_tokens=None: variable grids (aspect-ratio buckets)."""
    if target not in ("label", "caption"):
        raise ValueError(f"target must be 'label' or 'caption', got {target!r}")
    t = token_dtype(codebook_size)
    fields = [
        pa.field("tokens", pa.list_(t, n_tokens) if n_tokens else pa.list_(t), nullable=False),
        pa.field("grid_h", pa.int16(), nullable=False),
        pa.field("grid_w", pa.int16(), nullable=False),
        pa.field("label", pa.int32(), nullable=False) if target == "label" else pa.field("caption", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("aug", pa.int8(), nullable=False),
    ]
    if text_embed_dim:
        fields.append(pa.field("text_embedding", pa.list_(pa.float16(), text_embed_dim), nullable=False))
    return pa.schema(fields, metadata={"maskgil.schema_version": str(SCHEMA_VERSION)})


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}"


class _Dir:
    """A directory on any pyarrow filesystem with atomic-ish (temp + rename) writes."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = resolve(uri)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.File

    def size(self, *parts: str) -> int:
        return self.fs.get_file_info(self.path(*parts)).size

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read().decode()

    def _tmp(self, *parts: str) -> str:
        d, base = posixpath.split(self.path(*parts))
        return posixpath.join(d, f".{base}.tmp-{uuid.uuid4().hex[:8]}")  # hidden: dataset readers skip it

    def write_bytes(self, data: bytes, *parts: str) -> None:
        tmp = self._tmp(*parts)
        self.fs.create_dir(posixpath.dirname(tmp), recursive=True)
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.path(*parts))

    def write_table(self, table: pa.Table, *parts: str) -> None:
        tmp = self._tmp(*parts)
        self.fs.create_dir(posixpath.dirname(tmp), recursive=True)
        with self.fs.open_output_stream(tmp) as f:
            pq.write_table(table, f)
        self.fs.move(tmp, self.path(*parts))


class TokenShardWriter:
    """Writes complete shards and the final manifest into `out_uri`. Used by the pipeline's driver."""

    def __init__(self, out_uri: str, codebook_size: int, n_tokens: int | None, target: str, text_embed_dim: int | None = None):
        self.dir = _Dir(out_uri)
        self.codebook_size = codebook_size
        self.schema = token_schema(codebook_size, n_tokens, target, text_embed_dim)
        self.n_tokens = n_tokens
        self.target = target
        self.np_dtype = np.uint16 if self.schema.field("tokens").type.value_type == pa.uint16() else np.uint32

    def remove_stale_temps(self) -> int:
        """Delete temporary files a killed run left behind (one writer per output directory)."""
        d = self.dir.path(SHARDS_DIR)
        if self.dir.fs.get_file_info(d).type != pafs.FileType.Directory:
            return 0
        stale = [i.path for i in self.dir.fs.get_file_info(pafs.FileSelector(d))
                 if posixpath.basename(i.path).startswith(".") and ".tmp-" in i.path]
        for path in stale:
            self.dir.fs.delete_file(path)
        return len(stale)

    def invalidate_manifest(self) -> bool:
        """Delete manifest.json and the merged quarantine list (both describe the shards as a finished
        run left them) before a shard is (re)written; `finalize` writes new ones. True if one existed."""
        existed = self.dir.exists(MANIFEST)
        for name in (MANIFEST, QUARANTINE):  # the manifest first: without it nothing trusts the rest
            if self.dir.exists(name):
                self.dir.fs.delete_file(self.dir.path(name))
        return existed

    # -- completion records ------------------------------------------------------------------
    def done_record(self, shard_id: int) -> dict | None:
        name = shard_name(shard_id)
        if not self.dir.exists(SHARDS_DIR, name + ".done.json"):
            return None
        try:
            return json.loads(self.dir.read_text(SHARDS_DIR, name + ".done.json"))
        except ValueError:
            return None

    def is_complete(self, shard_id: int, fingerprint: str) -> bool:
        """True when shard `shard_id` was finished from the same inputs and settings and its files are intact."""
        rec = self.done_record(shard_id)
        if rec is None or rec.get("fingerprint") != fingerprint:
            return False
        name = shard_name(shard_id)
        return (self.dir.exists(SHARDS_DIR, name + ".parquet") and self.dir.size(SHARDS_DIR, name + ".parquet") == rec["bytes"]
                and self.dir.exists(SHARDS_DIR, name + ".quarantine.jsonl"))

    # -- one shard ---------------------------------------------------------------------------
    def make_table(self, rows: dict[str, Any]) -> pa.Table:
        """Columns -> Arrow table with the shard schema. `tokens`: (n, N) array or a list of 1-D arrays."""
        tokens = rows["tokens"]
        arrays = [np.asarray(t).reshape(-1) for t in tokens]
        for a, gh, gw in zip(arrays, rows["grid_h"], rows["grid_w"]):
            if a.size != gh * gw:
                raise ValueError(f"row has {a.size} tokens for a {gh}x{gw} grid")
            if self.n_tokens and a.size != self.n_tokens:
                raise ValueError(f"row has {a.size} tokens, shard schema holds {self.n_tokens}")
            if a.size and (a.min() < 0 or a.max() >= self.codebook_size):
                raise ValueError(f"token id outside [0, {self.codebook_size}): {int(a.min())}..{int(a.max())}")
        flat = np.concatenate(arrays).astype(self.np_dtype) if arrays else np.zeros(0, self.np_dtype)
        values = pa.array(flat, self.schema.field("tokens").type.value_type)
        if self.n_tokens:
            tok = pa.FixedSizeListArray.from_arrays(values, self.n_tokens)
        else:
            offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int32)
            tok = pa.ListArray.from_arrays(pa.array(offsets), values)
        cols = {"tokens": tok}
        for f in self.schema:
            if f.name == "tokens":
                continue
            if f.name not in rows:
                raise ValueError(f"missing column {f.name!r} for this shard schema")
            if f.name == "text_embedding":
                emb = np.asarray(rows["text_embedding"], np.float16)
                cols[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), f.type.list_size)
            else:
                cols[f.name] = pa.array(list(rows[f.name]), f.type)
        return pa.Table.from_pydict(cols, schema=self.schema)

    def write(self, shard_id: int, fingerprint: str, rows: dict[str, Any], quarantine: Sequence[dict], seen: int) -> dict:
        """Write shard `shard_id` (rows already in final order) + its quarantine list, then its completion record."""
        table = self.make_table(rows)
        written = len({s for s in rows["source"]})
        if written + len(quarantine) != seen:
            raise ValueError(f"shard {shard_id}: {written} written + {len(quarantine)} quarantined != {seen} seen")
        name = shard_name(shard_id)
        q = "".join(json.dumps({"source": r["source"], "reason": r["reason"], "shard": shard_id}) + "\n" for r in quarantine)
        self.dir.write_bytes(q.encode(), SHARDS_DIR, name + ".quarantine.jsonl")
        self.dir.write_table(table, SHARDS_DIR, name + ".parquet")
        rec = {"shard": shard_id, "file": f"{SHARDS_DIR}/{name}.parquet", "rows": table.num_rows, "seen": seen,
               "written_inputs": written, "quarantined": len(quarantine), "fingerprint": fingerprint,
               "bytes": self.dir.size(SHARDS_DIR, name + ".parquet")}
        self.dir.write_bytes((json.dumps(rec) + "\n").encode(), SHARDS_DIR, name + ".done.json")
        return rec

    # -- the whole output ----------------------------------------------------------------------
    def finalize(self, n_shards: int, fields: dict[str, Any]) -> dict:
        """Check every shard is complete, merge quarantine lists, write manifest.json (last)."""
        recs = []
        for k in range(n_shards):
            rec = self.done_record(k)
            if rec is None:
                raise RuntimeError(f"shard {k} of {n_shards} is not complete; rerun to finish")
            recs.append(rec)
        seen = sum(r["seen"] for r in recs)
        quarantined = sum(r["quarantined"] for r in recs)
        written_inputs = sum(r["written_inputs"] for r in recs)
        if seen != written_inputs + quarantined:
            raise RuntimeError(f"counts do not reconcile: seen {seen} != written {written_inputs} + quarantined {quarantined}")
        lines = "".join(self.dir.read_text(SHARDS_DIR, shard_name(k) + ".quarantine.jsonl") for k in range(n_shards))
        self.dir.write_bytes(lines.encode(), QUARANTINE)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            **fields,
            "codebook_size": self.codebook_size,
            "token_dtype": str(self.schema.field("tokens").type.value_type),
            "target": self.target,
            "rows_written": sum(r["rows"] for r in recs),
            "inputs_seen": seen,
            "inputs_written": written_inputs,
            "inputs_quarantined": quarantined,
            "shards": [{k: r[k] for k in ("file", "rows", "seen", "quarantined", "bytes")} for r in recs],
        }
        self.dir.write_bytes((json.dumps(manifest, indent=2) + "\n").encode(), MANIFEST)
        return manifest


# ---------------------------------------------------------------------------------------------
# Reading.


def read_manifest(shard_dir: str) -> dict:
    d = _Dir(str(shard_dir))
    if not d.exists(MANIFEST):
        raise FileNotFoundError(f"{shard_dir}: no {MANIFEST}, so not a finished token-shard directory "
                                "(a pretokenize run may still be running or was stopped: rerun it to finish)")
    m = json.loads(d.read_text(MANIFEST))
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{shard_dir}: schema_version {m.get('schema_version')} but this reader knows {SCHEMA_VERSION}")
    return m


class StaleManifest(ValueError):
    """The shards on disk are not the ones manifest.json lists (changed after it was written)."""


def shard_files(shard_dir: str) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, paths) of the shards listed in the manifest, in shard order, after checking each
    one's size against the manifest: one directory listing, so cheap on object stores too."""
    m = read_manifest(shard_dir)
    d = _Dir(str(shard_dir))
    paths = [d.path(s["file"]) for s in m["shards"]]
    sizes = {}  # keyed (folder, name), not by the path string a listing happens to spell
    for parent in sorted({posixpath.dirname(p) for p in paths}):
        try:
            sizes.update(((parent, posixpath.basename(i.path)), i.size) for i in d.fs.get_file_info(pafs.FileSelector(parent))
                         if i.type == pafs.FileType.File)
        except FileNotFoundError:
            pass
    for s, path in zip(m["shards"], paths):
        size = sizes.get((posixpath.dirname(path), posixpath.basename(path)))
        if size is None:
            raise StaleManifest(f"{shard_dir}: {s['file']} is listed in {MANIFEST} but missing; rerun pretokenize to rebuild it")
        if s.get("bytes") is not None and size != s["bytes"]:
            raise StaleManifest(f"{shard_dir}: {s['file']} is {size} bytes but {MANIFEST} says {s['bytes']}: the shards "
                                "changed after the manifest was written (another pretokenize run into this directory?); "
                                "rerun pretokenize with the settings you want to finish it")
    return d.fs, paths


def _check_rows(shard_dir: str, entry: dict, table: pa.Table) -> pa.Table:
    """A shard read in full must hold the rows the manifest counted (free next to reading it)."""
    if entry.get("rows") is not None and table.num_rows != entry["rows"]:
        raise StaleManifest(f"{shard_dir}: {entry['file']} holds {table.num_rows} rows but {MANIFEST} says {entry['rows']}; "
                            "rerun pretokenize to finish it")
    return table


def _grid_of(manifest: dict, table: pa.Table, grid: tuple[int, int] | None) -> tuple[pa.Table, tuple[int, int]]:
    gh = table.column("grid_h").to_numpy()
    gw = table.column("grid_w").to_numpy()
    grids = sorted({(int(a), int(b)) for a, b in zip(gh, gw)})
    if grid is None:
        if len(grids) > 1:
            raise ValueError(f"shards hold several token grids {grids}: pass grid=(h, w) to pick one")
        return table, grids[0] if grids else tuple(manifest.get("grid") or (0, 0))
    keep = (gh == grid[0]) & (gw == grid[1])
    return table.filter(pa.array(keep)), tuple(grid)


def load_tokens(shard_dir: str, grid: tuple[int, int] | None = None) -> dict[str, Any]:
    """All rows of one grid as numpy: {"tokens": int64 (n, h*w), "label" or "caption", "grid": (h, w)}."""
    m = read_manifest(shard_dir)
    fs, files = shard_files(shard_dir)
    table = pa.concat_tables([_check_rows(shard_dir, s, pq.read_table(f, filesystem=fs))
                              for s, f in zip(m["shards"], files)]) if files else None
    if table is None or table.num_rows == 0:
        raise ValueError(f"{shard_dir}: no rows")
    table, (h, w) = _grid_of(m, table, grid)
    values = table.column("tokens").combine_chunks().flatten().to_numpy()
    out: dict[str, Any] = {"tokens": values.astype(np.int64).reshape(table.num_rows, h * w), "grid": (h, w)}
    if "label" in table.column_names:
        out["label"] = table.column("label").to_numpy().astype(np.int64)
    if "caption" in table.column_names:
        out["caption"] = table.column("caption").to_pylist()
    return out


def label_range(shard_dir: str) -> tuple[int, int] | None:
    """(smallest, largest) class label over all shards, from the Parquet footers' statistics (a row
    group without them reads its label column only): a trainer can refuse labels its model has no
    class for before any worker starts. None for caption shards or shards without rows."""
    fs, paths = shard_files(shard_dir)
    lo = hi = None
    for path in paths:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            meta = pf.metadata
            col = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == "label"), None)
            if col is None:
                return None
            for rg in range(meta.num_row_groups):
                group = meta.row_group(rg)
                if group.num_rows == 0:
                    continue
                st = group.column(col).statistics
                if st is not None and st.has_min_max:
                    a, b = int(st.min), int(st.max)
                else:
                    values = pf.read_row_group(rg, columns=["label"]).column(0).to_numpy()
                    a, b = int(values.min()), int(values.max())
                lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    return None if lo is None else (lo, hi)


def iter_token_batches(shard_dir: str, batch_size: int, shuffle: bool = False, seed: int = 0,
                       grid: tuple[int, int] | None = None, drop_last: bool = False) -> Iterator[dict[str, Any]]:
    """One pass over the shards as torch batches: {"tokens": (B, h*w) long, "label": (B,) long, "grid": (h, w)}
    (caption sets: "caption": list[str] instead of "label"). Shuffle is a seeded global permutation.
    Holds the chosen grid's tokens in memory as int64 (8 bytes per token): for tests
    and small sets; training at scale reads `token_dataset` instead."""
    import torch

    data = load_tokens(shard_dir, grid)
    n = len(data["tokens"])
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    for lo in range(0, n, batch_size):
        idx = order[lo:lo + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        batch: dict[str, Any] = {"tokens": torch.from_numpy(data["tokens"][idx]), "grid": data["grid"]}
        if "label" in data:
            batch["label"] = torch.from_numpy(data["label"][idx])
        if "caption" in data:
            batch["caption"] = [data["caption"][i] for i in idx]
        yield batch


def _to_training_columns(batch: pa.Table) -> dict[str, np.ndarray]:
    n = batch.num_rows
    out = {"tokens": batch.column("tokens").combine_chunks().flatten().to_numpy().astype(np.int64).reshape(n, -1)}
    if "label" in batch.column_names:
        out["label"] = batch.column("label").to_numpy().astype(np.int64)
    if "caption" in batch.column_names:
        out["caption"] = np.array(batch.column("caption").to_pylist(), dtype=object)
    return out


def token_dataset(shard_dir: str, grid: tuple[int, int] | None = None):
    """The shards as a `ray.data.Dataset` of {"tokens": int64 (h*w,), "label": int64} rows (caption
    sets: "caption" str instead of "label"), for Ray Train (`get_dataset_shard(...).iter_batches(...)`).

    Shards with aspect-ratio buckets hold several grids: `grid` picks one, and grid=None keeps them
    all, each row with its own "grid_h", "grid_w" and a variable-length "tokens" list; group those
    into one-grid batches with `bucket_batches`."""
    import ray.data

    from ray.data.expressions import col

    m = read_manifest(shard_dir)
    fs, files = shard_files(shard_dir)
    ds = ray.data.read_parquet(files, filesystem=fs)
    fixed = tuple(m["grid"]) if m.get("grid") else None
    keep = ["tokens", "caption" if m.get("target") == "caption" else "label"]
    if fixed is None:  # aspect-ratio buckets: several grids in the same files
        if grid is None:
            return ds.select_columns(keep + ["grid_h", "grid_w"])
        ds = ds.filter(expr=(col("grid_h") == int(grid[0])) & (col("grid_w") == int(grid[1])))
    elif grid is not None and tuple(grid) != fixed:
        raise ValueError(f"{shard_dir}: shards hold a {fixed[0]}x{fixed[1]} token grid, not {grid[0]}x{grid[1]}")
    return ds.select_columns(keep).map_batches(_to_training_columns, batch_format="pyarrow")


def is_bucketed(shard_dir: str) -> bool:
    """Whether the shards hold several token grids (pretokenized with aspect-ratio buckets)."""
    return not read_manifest(shard_dir).get("grid")


def bucket_grids(shard_dir: str) -> list[tuple[int, int]]:
    """Token grids (h, w) of the aspect-ratio buckets of a shard set, from its manifest's bucket image
    sizes (w, h) and tokenizer downsample factor; [] when the manifest does not say."""
    m = read_manifest(shard_dir)
    d = (m.get("tokenizer") or {}).get("downsample")
    return [(h // d, w // d) for w, h in m.get("buckets") or []] if d else []


def bucket_batches(batches: Iterable[dict], batch_size: int) -> Iterator[dict[str, Any]]:
    """Regroup rows of mixed grids into batches of exactly `batch_size` rows that share one grid.

    `batches`: numpy dicts with "tokens" (rows of h*w ids, an object array when grids differ),
    "grid_h", "grid_w" and "label" or "caption" (what `token_dataset(grid=None)` gives). Yields
    {"tokens": int64 (batch_size, h*w), "grid": (h, w), "label" | "caption"} as soon as a grid's
    buffer fills, so the input order (shuffled upstream) decides which bucket comes next; rows
    left in partly filled buffers at the end are dropped, like `drop_last`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    buffers: dict[tuple[int, int], list[tuple]] = {}
    for b in batches:
        target = "caption" if "caption" in b else "label"
        for tokens, h, w, c in zip(b["tokens"], b["grid_h"], b["grid_w"], b[target]):
            grid = (int(h), int(w))
            if len(tokens) != grid[0] * grid[1]:
                raise ValueError(f"a row holds {len(tokens)} tokens for a {grid[0]}x{grid[1]} grid")
            rows = buffers.setdefault(grid, [])
            rows.append((tokens, c))
            if len(rows) == batch_size:
                del buffers[grid]
                out: dict[str, Any] = {"tokens": np.stack([r[0] for r in rows]).astype(np.int64), "grid": grid}
                out[target] = (np.array([r[1] for r in rows], dtype=object) if target == "caption"
                               else np.array([r[1] for r in rows], dtype=np.int64))
                yield out
