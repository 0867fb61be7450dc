"""Token shard files: schema, crash-safe writing, completion records, manifest, plain reader (no Ray)."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from maskgil.data.pretokenize import ShardAssembler
from maskgil.data.shards import (TokenShardWriter, bucket_batches, bucket_grids, is_bucketed, iter_token_batches,
                                 label_range, load_tokens, read_manifest, token_dtype, token_schema)


def _rows(n, n_tok, codebook, seed=0, label0=0):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, codebook, (n, n_tok)), "grid_h": [2] * n, "grid_w": [n_tok // 2] * n,
            "label": list(range(label0, label0 + n)), "source": [f"img{label0 + i}" for i in range(n)], "aug": [0] * n}


def test_token_dtype_boundary():
    assert token_dtype(65536) == pa.uint16()  # ids 0..65535 fit
    assert token_dtype(65537) == pa.uint32()
    assert token_dtype(262144) == pa.uint32()
    s = token_schema(16384, 256, "label")
    assert s.field("tokens").type == pa.list_(pa.uint16(), 256)
    assert s.names == ["tokens", "grid_h", "grid_w", "label", "source", "aug"]
    c = token_schema(16384, None, "caption", text_embed_dim=384)
    assert c.field("tokens").type == pa.list_(pa.uint16())
    assert c.field("text_embedding").type == pa.list_(pa.float16(), 384)
    assert "caption" in c.names and "label" not in c.names


@pytest.mark.parametrize("codebook", [512, 262144])
def test_write_read_round_trip(tmp_path, codebook):
    w = TokenShardWriter(str(tmp_path), codebook, 8, "label")
    rows = [_rows(5, 8, codebook, seed=k, label0=10 * k) for k in range(2)]
    for k in range(2):
        rec = w.write(k, f"fp{k}", rows[k], quarantine=[{"source": f"bad{k}", "reason": "not an image"}], seen=6)
        assert rec["rows"] == 5 and rec["quarantined"] == 1 and rec["seen"] == 6
    m = w.finalize(2, {"image_size": 32, "grid": [2, 4]})
    assert (m["rows_written"], m["inputs_seen"], m["inputs_written"], m["inputs_quarantined"]) == (10, 12, 10, 2)
    assert read_manifest(str(tmp_path))["token_dtype"] == ("uint16" if codebook <= 65536 else "uint32")
    assert not is_bucketed(str(tmp_path)) and bucket_grids(str(tmp_path)) == []
    t = pq.read_table(tmp_path / "shards" / "shard-000001.parquet")
    assert t.schema.field("tokens").type.value_type == (pa.uint16() if codebook <= 65536 else pa.uint32())
    got = load_tokens(str(tmp_path))
    expect = np.concatenate([r["tokens"] for r in rows])
    assert np.array_equal(got["tokens"], expect) and got["tokens"].dtype == np.int64
    assert got["label"].tolist() == list(range(5)) + list(range(10, 15)) and got["grid"] == (2, 4)
    q = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert q == [{"source": "bad0", "reason": "not an image", "shard": 0}, {"source": "bad1", "reason": "not an image", "shard": 1}]


def test_writer_refuses_bad_rows(tmp_path):
    w = TokenShardWriter(str(tmp_path), 512, 8, "label")
    rows = _rows(3, 8, 512)
    rows["tokens"][1, 2] = 512
    with pytest.raises(ValueError, match=r"outside \[0, 512\)"):
        w.write(0, "fp", rows, [], 3)
    with pytest.raises(ValueError, match="3 written \\+ 0 quarantined != 4 seen"):
        w.write(0, "fp", _rows(3, 8, 512), [], 4)
    bad = _rows(3, 8, 512)
    bad["grid_w"] = [3] * 3
    with pytest.raises(ValueError, match="2x3 grid"):
        w.write(0, "fp", bad, [], 3)


def test_completion_record_decides_what_is_complete(tmp_path):
    w = TokenShardWriter(str(tmp_path), 512, 8, "label")
    assert not w.is_complete(0, "fp")
    w.write(0, "fp", _rows(3, 8, 512), [], 3)
    assert w.is_complete(0, "fp") and not w.is_complete(0, "other-settings")
    # Temp files are hidden and nothing else is left behind.
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names == ["shard-000000.done.json", "shard-000000.parquet", "shard-000000.quarantine.jsonl"]
    # A parquet whose size differs from the record (e.g. overwritten by a killed rerun) is not complete.
    (tmp_path / "shards" / "shard-000000.parquet").write_bytes(b"partial")
    assert not w.is_complete(0, "fp")
    # A shard renamed into place whose record was never written (killed in between) is not complete.
    w.write(1, "fp", _rows(3, 8, 512), [], 3)
    (tmp_path / "shards" / "shard-000001.done.json").unlink()
    assert not w.is_complete(1, "fp")
    with pytest.raises(RuntimeError, match="shard 1 of 2 is not complete"):
        w.finalize(2, {})
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(str(tmp_path))


def test_iter_token_batches(tmp_path):
    w = TokenShardWriter(str(tmp_path), 512, 8, "label")
    rows = _rows(10, 8, 512)
    w.write(0, "fp", rows, [], 10)
    w.finalize(1, {"grid": [2, 4]})
    batches = list(iter_token_batches(str(tmp_path), batch_size=4))
    assert [b["tokens"].shape for b in batches] == [(4, 8), (4, 8), (2, 8)]
    assert batches[0]["tokens"].dtype == torch.long and batches[0]["label"].dtype == torch.long
    assert batches[0]["grid"] == (2, 4)
    assert torch.equal(torch.cat([b["tokens"] for b in batches]), torch.from_numpy(rows["tokens"]))
    assert len(list(iter_token_batches(str(tmp_path), 4, drop_last=True))) == 2
    a = list(iter_token_batches(str(tmp_path), 10, shuffle=True, seed=1))[0]
    b = list(iter_token_batches(str(tmp_path), 10, shuffle=True, seed=1))[0]
    c = list(iter_token_batches(str(tmp_path), 10, shuffle=True, seed=2))[0]
    assert torch.equal(a["label"], b["label"]) and not torch.equal(a["label"], c["label"])
    assert sorted(a["label"].tolist()) == list(range(10))
    # rows stay intact under shuffling: tokens follow their label
    for tok, lab in zip(a["tokens"], a["label"]):
        assert torch.equal(tok, torch.from_numpy(rows["tokens"][lab]))


def test_variable_grids_need_a_choice(tmp_path):
    w = TokenShardWriter(str(tmp_path), 512, None, "caption")
    toks = [np.arange(8), np.arange(6), np.arange(8) + 1]
    w.write(0, "fp", {"tokens": toks, "grid_h": [2, 2, 2], "grid_w": [4, 3, 4], "caption": ["a", "b", "c"],
                      "source": ["x", "y", "z"], "aug": [0, 0, 0]}, [], 3)
    w.finalize(1, {"grid": None, "buckets": [[32, 16], [24, 16]], "tokenizer": {"downsample": 8}})
    assert is_bucketed(str(tmp_path)) and bucket_grids(str(tmp_path)) == [(2, 4), (2, 3)]  # (w, h) px -> (h, w) tokens
    with pytest.raises(ValueError, match="several token grids"):
        list(iter_token_batches(str(tmp_path), 2))
    (b,) = list(iter_token_batches(str(tmp_path), 4, grid=(2, 4)))
    assert b["caption"] == ["a", "c"] and b["tokens"].tolist() == [list(range(8)), list(range(1, 9))]


def test_bucket_batches_regroup_rows_by_grid():
    """Mixed-grid rows (what token_dataset gives for bucketed shards) come out as one-grid batches
    of exactly the batch size, each row intact, in arrival order within its grid; leftovers drop."""
    grids = [(4, 4), (3, 5), (5, 3)]
    rng = np.random.default_rng(0)
    order = rng.integers(0, 3, 50)  # row i has grid grids[order[i]] and tokens [i, i, ...]
    rows = [(np.full(grids[k][0] * grids[k][1], i, np.uint16), *grids[k], f"cap {i}") for i, k in enumerate(order)]

    def incoming(size):  # numpy batches as Ray Data yields them: object arrays when lengths differ
        for lo in range(0, len(rows), size):
            chunk = rows[lo:lo + size]
            tokens = np.empty(len(chunk), dtype=object)
            tokens[:] = [r[0] for r in chunk]
            yield {"tokens": tokens, "grid_h": np.array([r[1] for r in chunk], np.int16),
                   "grid_w": np.array([r[2] for r in chunk], np.int16),
                   "caption": np.array([r[3] for r in chunk], dtype=object)}

    out = list(bucket_batches(incoming(7), 4))
    want = {g: [i for i, k in enumerate(order) if grids[k] == g] for g in grids}
    for g in grids:  # the i-th batch of grid g holds that grid's rows 4i..4i+3
        got = [b for b in out if b["grid"] == g]
        assert len(got) == len(want[g]) // 4
        for j, b in enumerate(got):
            ids = want[g][4 * j:4 * j + 4]
            assert b["tokens"].dtype == np.int64 and b["tokens"].shape == (4, g[0] * g[1])
            assert b["tokens"][:, 0].tolist() == ids and (b["tokens"] == b["tokens"][:, :1]).all()
            assert list(b["caption"]) == [f"cap {i}" for i in ids]
    # a batch is emitted as soon as its grid's 4th row arrives: order by the arrival of that row
    done = sorted((want[g][4 * j + 3], g, j) for g in grids for j in range(len(want[g]) // 4))
    assert [(b["grid"], int(b["tokens"][0, 0])) for b in out] == [(g, want[g][4 * j]) for _, g, j in done]
    labels = {"tokens": np.arange(12).reshape(3, 4), "grid_h": np.array([2, 2, 2]), "grid_w": np.array([2, 2, 2]),
              "label": np.array([5, 6, 7])}
    (b,) = bucket_batches([labels], 3)
    assert b["label"].tolist() == [5, 6, 7] and b["grid"] == (2, 2)
    with pytest.raises(ValueError, match="3 tokens for a 2x2 grid"):
        list(bucket_batches([{**labels, "tokens": np.arange(9).reshape(3, 3)}], 3))


def test_assembler_waits_for_all_records():
    def rec(shard, index, kind, **kw):
        base = {"shard": shard, "index": index, "aug": 0, "kind": kind, "source": f"s{index}", "label": 3, "caption": "",
                "reason": "", "n_rows": -1, "n_bad": -1, "seen": -1, "tokens": b"", "grid_h": 0, "grid_w": 0}
        base.update(kw)
        return base

    def batch(records):
        return {k: np.array([r[k] for r in records], dtype=object) for k in records[0]}

    tok = lambda v: np.array([v, v + 1], np.uint16).tobytes()  # noqa: E731
    a = ShardAssembler("label")
    # The end record overtakes its shard's rows; a row of another shard is interleaved.
    assert a.add(batch([rec(0, -1, "end", n_rows=2, n_bad=1, seen=3), rec(0, 1, "row", tokens=tok(5), grid_h=1, grid_w=2)])) == []
    assert a.add(batch([rec(1, 0, "row", tokens=tok(7), grid_h=1, grid_w=2), rec(0, 2, "bad", reason="truncated")])) == []
    assert a.add(batch([rec(0, 0, "row", tokens=tok(1), grid_h=1, grid_w=2)])) == [0]
    cols, bad, seen = a.take(0)
    assert seen == 3 and bad == [{"source": "s2", "reason": "truncated"}]
    assert cols["source"] == ["s0", "s1"] and [t.tolist() for t in cols["tokens"]] == [[1, 2], [5, 6]]
    assert a.pending == 1  # shard 1 still open


def test_optional_text_embedding_column(tmp_path):
    w = TokenShardWriter(str(tmp_path), 512, 8, "caption", text_embed_dim=4)
    emb = np.array([[0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.125, 3.0]], np.float32)  # exact in float16
    w.write(0, "fp", {"tokens": np.zeros((2, 8), int), "grid_h": [2, 2], "grid_w": [4, 4], "caption": ["a", "b"],
                      "source": ["x", "y"], "aug": [0, 0], "text_embedding": emb}, [], 2)
    t = pq.read_table(tmp_path / "shards" / "shard-000000.parquet")
    assert t.schema.field("text_embedding").type == pa.list_(pa.float16(), 4)
    assert np.array_equal(np.array(t.column("text_embedding").to_pylist(), np.float32), emb)
    with pytest.raises(ValueError, match="missing column 'text_embedding'"):
        w.write(1, "fp", {"tokens": np.zeros((1, 8), int), "grid_h": [2], "grid_w": [4], "caption": ["a"],
                          "source": ["x"], "aug": [0]}, [], 1)


def test_label_range_from_the_footers_or_from_the_column(tmp_path):
    """The labels' span over all shards, from the Parquet statistics; a file written without them
    (another writer) is read instead. Caption shards have no labels."""
    w = TokenShardWriter(str(tmp_path), 512, 8, "label")
    w.write(0, "fp0", _rows(3, 8, 512, label0=7), [], 3)  # labels 7..9
    w.write(1, "fp1", _rows(4, 8, 512, label0=2), [], 4)  # labels 2..5
    w.finalize(2, {})
    assert label_range(str(tmp_path)) == (2, 9)
    path = tmp_path / "shards" / "shard-000000.parquet"
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("label"), "label", pa.array([-1, 12, 3], pa.int32()))
    pq.write_table(t, path, write_statistics=False)
    group = pq.ParquetFile(path).metadata.row_group(0)
    assert all(group.column(j).statistics is None for j in range(group.num_columns))
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0]["bytes"] = path.stat().st_size
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert label_range(str(tmp_path)) == (-1, 12)
    c = TokenShardWriter(str(tmp_path / "captions"), 512, 8, "caption")
    c.write(0, "fp", {"tokens": np.zeros((1, 8), int), "grid_h": [2], "grid_w": [4], "caption": ["a"],
                      "source": ["x"], "aug": [0]}, [], 1)
    c.finalize(1, {})
    assert label_range(str(tmp_path / "captions")) is None


def test_reader_refuses_shards_changed_after_the_manifest(tmp_path):
    """A finished run (tokenizer A), then a rerun with tokenizer B into the same directory that stopped
    after one shard: the old manifest must not vouch for the mix (it used to: 8 rows of both runs)."""
    w = TokenShardWriter(str(tmp_path), 512, 8, "label")
    for k in range(2):
        w.write(k, f"A-{k}", _rows(3, 8, 512, seed=k, label0=3 * k), [], 3)
    w.finalize(2, {"tokenizer": {"weights_sha256": "A"}})
    assert len(load_tokens(str(tmp_path))["tokens"]) == 6
    w.write(0, "B-0", _rows(5, 8, 512, seed=9), [], 5)  # what a B run writes if it skips invalidate_manifest
    with pytest.raises(ValueError, match=r"shard-000000.parquet is \d+ bytes but manifest.json says \d+"):
        load_tokens(str(tmp_path))
    # The row count the manifest recorded is checked too, where a shard is read whole anyway.
    w.write(0, "A-0", _rows(3, 8, 512, seed=0), [], 3)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0]["rows"] = 4
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="holds 3 rows but manifest.json says 4"):
        load_tokens(str(tmp_path))
    (tmp_path / "shards" / "shard-000001.parquet").unlink()
    with pytest.raises(ValueError, match="shard-000001.parquet is listed in manifest.json but missing"):
        load_tokens(str(tmp_path))


def test_invalidate_manifest_removes_what_the_finished_run_left(tmp_path):
    w = TokenShardWriter(str(tmp_path), 512, 8, "label")
    assert not w.invalidate_manifest()  # nothing to remove: fine
    w.write(0, "A-0", _rows(3, 8, 512), [{"source": "x", "reason": "not an image"}], 4)
    w.finalize(1, {})
    assert w.invalidate_manifest()
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "quarantine.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_tokens(str(tmp_path))
    assert w.is_complete(0, "A-0")  # shards and their records are kept: a same-settings rerun still resumes


@pytest.mark.parametrize("n_tokens", [8, None])
def test_a_shard_with_every_input_quarantined(tmp_path, n_tokens):
    """A shard with no rows (all its inputs quarantined) is written, finalized and read: the other
    shards' rows load, label_range skips its empty row group, and all-empty shards give None."""
    w = TokenShardWriter(str(tmp_path), 512, n_tokens, "label")
    empty = {"tokens": [], "grid_h": [], "grid_w": [], "label": [], "source": [], "aug": []}
    bad = [{"source": "a", "reason": "not an image"}, {"source": "b", "reason": "too small"}]
    rec = w.write(0, "fp0", empty, bad, 2)
    assert (rec["rows"], rec["written_inputs"], rec["quarantined"], rec["seen"]) == (0, 0, 2, 2)
    assert w.is_complete(0, "fp0")
    w.write(1, "fp1", _rows(3, 8, 512, label0=4), [], 3)
    m = w.finalize(2, {"grid": [2, 4] if n_tokens else None})
    assert (m["rows_written"], m["inputs_seen"], m["inputs_written"], m["inputs_quarantined"]) == (3, 5, 3, 2)
    got = load_tokens(str(tmp_path))
    assert got["tokens"].shape == (3, 8) and got["label"].tolist() == [4, 5, 6]
    assert label_range(str(tmp_path)) == (4, 6)
    only = TokenShardWriter(str(tmp_path / "only"), 512, n_tokens, "label")
    only.write(0, "fp", empty, bad[:1], 1)
    only.finalize(1, {})
    assert label_range(str(tmp_path / "only")) is None
    with pytest.raises(ValueError, match="no rows"):
        load_tokens(str(tmp_path / "only"))
