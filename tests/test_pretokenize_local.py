"""The pretokenize driver in this process (`local_stream`: the same decode and tokenize stages, no
Ray): resume, manifest invalidation on reruns with other settings, quarantine of unusable labels
and captions, all counted in the manifest."""
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from maskgil.checkpoint import weights_hash
from maskgil.data.images import DecodeLimits, Preprocess
from maskgil.data.embedded import write_imagenet_folder
from maskgil.data.pretokenize import (PretokenizeConfig, caption_problem, label_problem, local_stream, run_pretokenize,
                                     settings_fingerprint, shard_records)
from maskgil.data.shards import load_tokens, read_manifest
from maskgil.data.sources import Columns, plan_shards
from maskgil.tokenizers import build_tokenizer

SIZE = 32  # the tiny tokenizer downsamples 8x -> 4x4 tokens


def _jpeg(k: int) -> bytes:
    rng = np.random.default_rng(k)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(b, "JPEG", quality=95)
    return b.getvalue()


def _parquet(path: Path, labels=None, captions=None, classes=None, row_group_size=None, names=Columns()) -> Path:
    """Hugging Face style Parquet: image bytes + label and/or caption; `classes` adds a ClassLabel feature;
    `names` the column names, `row_group_size` the rows per row group (default: one group)."""
    path.mkdir(parents=True, exist_ok=True)
    n = len(labels if labels is not None else captions)
    cols = {names.image: pa.array([_jpeg(k) for k in range(n)], pa.binary())}
    if labels is not None:
        cols[names.label] = pa.array(labels, pa.int64())
    if captions is not None:
        cols[names.caption] = pa.array(captions)
    table = pa.table(cols)
    if classes:
        features = {"info": {"features": {"label": {"names": [f"c{i}" for i in range(classes)], "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({"huggingface": json.dumps(features)})
    pq.write_table(table, path / "train-00000-of-00001.parquet", row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two tiny tokenizers with different weights: "A" and "B"."""
    out = {}
    for seed, name in ((0, "A"), (1, "B")):
        torch.manual_seed(seed)
        d = tmp_path_factory.mktemp(f"tok{name}")
        build_tokenizer("llamagen-vq-tiny").save_pretrained(d, extra={"name": f"tiny-{name}"})
        out[name] = str(d)
    return out


def _cfg(source, out, tok, **kw):
    kw.setdefault("rows_per_shard", 4)
    return PretokenizeConfig(source=str(source), format="parquet", out=str(out), tokenizer=tok, image_size=SIZE,
                             batch_size=8, **kw)


def _run(cfg):
    return run_pretokenize(cfg, progress=False, stream=local_stream)


def _mtimes(out: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "shards").glob("*.parquet"))}


def test_rerun_with_another_tokenizer_never_mixes_shards(tokenizers, tmp_path):
    src = _parquet(tmp_path / "src", labels=list(range(12)))
    out = tmp_path / "out"
    a = _run(_cfg(src, out, tokenizers["A"]))
    assert a["complete"] and a["reconciled"] and a["shards_written"] == 3 and a["rows_written"] == 12
    tokens_a = load_tokens(str(out))["tokens"]

    # Tokenizer B into the same directory, stopped after one shard (as --max-new-shards or a kill would).
    b1 = _run(_cfg(src, out, tokenizers["B"], max_new_shards=1))
    assert not b1["complete"] and b1["shards_written"] == 1
    assert not (out / "manifest.json").exists() and not (out / "quarantine.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_tokens(str(out))  # used to return 8 rows of both tokenizers under A's manifest

    # B resumes: the shard it wrote is kept, the two A shards are redone.
    before = _mtimes(out)
    b2 = _run(_cfg(src, out, tokenizers["B"]))
    assert b2["complete"] and b2["reconciled"] and (b2["shards_skipped"], b2["shards_written"]) == (1, 2)
    after = _mtimes(out)
    assert sum(before[n] == after[n] for n in after) == 1
    m = read_manifest(str(out))
    assert m["tokenizer"]["weights_sha256"] == weights_hash(tokenizers["B"]) and m["rows_written"] == 12
    for s in m["shards"]:  # every listed shard is B's, as the manifest says
        done = json.loads((out / s["file"].replace(".parquet", ".done.json")).read_text())
        assert done["fingerprint"].split("-")[0] == m["settings_fingerprint"] and done["bytes"] == s["bytes"]
    tokens_b = load_tokens(str(out))["tokens"]
    assert tokens_b.shape == tokens_a.shape and not np.array_equal(tokens_a, tokens_b)

    # A fresh B run elsewhere gives the same shards: nothing of A's is left in the mix.
    fresh = tmp_path / "fresh"
    _run(_cfg(src, fresh, tokenizers["B"]))
    assert np.array_equal(load_tokens(str(fresh))["tokens"], tokens_b)

    # The same settings again: nothing redone, the manifest stays.
    again = _run(_cfg(src, out, tokenizers["B"]))
    assert again["complete"] and (again["shards_skipped"], again["shards_written"]) == (3, 0)
    assert _mtimes(out) == after and read_manifest(str(out))["rows_written"] == 12


def test_unusable_labels_are_quarantined_and_counted(tokenizers, tmp_path):
    src = _parquet(tmp_path / "src", labels=[0, -1, 2, 3, None, -7, 1], classes=3)
    s = _run(_cfg(src, tmp_path / "out", tokenizers["A"]))
    assert s["complete"] and s["reconciled"]
    assert (s["inputs_seen"], s["inputs_written"], s["inputs_quarantined"]) == (7, 3, 4)
    assert load_tokens(str(tmp_path / "out"))["label"].tolist() == [0, 2, 1]
    q = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    f = "train-00000-of-00001.parquet"
    assert q == [{"source": f"{f}#1", "reason": "negative label -1 (unlabelled)", "shard": 0},
                 {"source": f"{f}#3", "reason": "label 3 out of range: the source declares 3 classes", "shard": 0},
                 {"source": f"{f}#4", "reason": "no label", "shard": 1},
                 {"source": f"{f}#5", "reason": "negative label -7", "shard": 1}]
    assert read_manifest(str(tmp_path / "out"))["inputs_quarantined"] == 4


def test_unusable_captions_are_quarantined_and_lists_give_one_caption(tokenizers, tmp_path):
    src = _parquet(tmp_path / "src", captions=[["a dog", "a brown dog"], ["  ", "cat"], [], ["", " \n"], ["fish"]])
    s = _run(_cfg(src, tmp_path / "out", tokenizers["A"]))
    assert s["complete"] and s["reconciled"] and (s["inputs_seen"], s["inputs_quarantined"]) == (5, 2)
    assert load_tokens(str(tmp_path / "out"))["caption"] == ["a dog", "cat", "fish"]  # never "['a dog', ...]"
    q = [json.loads(line)["reason"] for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert q == ["no caption", "no caption"]


def test_shard_records_refuse_blank_and_non_text_captions(tmp_path):
    src = _parquet(tmp_path / "src", captions=["a cat", "   ", "\t\n", "", "ok"])
    (shard,) = plan_shards(str(src), "parquet", rows_per_shard=10)
    recs = list(shard_records(shard, Preprocess(SIZE), DecodeLimits(), "caption"))
    assert [(r["kind"], r.get("caption"), r.get("reason")) for r in recs[:-1]] == [
        ("row", "a cat", None), ("bad", None, "no caption"), ("bad", None, "no caption"), ("bad", None, "no caption"),
        ("row", "ok", None)]
    assert recs[-1]["kind"] == "end" and (recs[-1]["n_rows"], recs[-1]["n_bad"], recs[-1]["seen"]) == (2, 3, 5)
    assert caption_problem({"text": "x"}) == "caption is not a string: dict"
    assert caption_problem([1, 2]) == "caption is not a string: list" and caption_problem("a") is None


def test_label_problem():
    assert label_problem(0) is None and label_problem(np.int64(4), 5) is None and label_problem(10**6) is None
    assert label_problem(None) == "no label"
    assert label_problem(-1) == "negative label -1 (unlabelled)" and label_problem(-3, 10) == "negative label -3"
    assert label_problem(5, 5) == "label 5 out of range: the source declares 5 classes"
    assert label_problem(True) == "label is not an integer: bool" and label_problem("n014") == "label is not an integer: str"
    assert label_problem(1.0) == "label is not an integer: float"


def _sources(out: Path) -> list[str]:
    m = read_manifest(str(out))
    return sum((pq.read_table(out / x["file"]).column("source").to_pylist() for x in m["shards"]), [])


def test_parquet_shards_read_the_right_rows_across_row_groups(tokenizers, tmp_path):
    """Row groups of 4 and shards of 6 rows: a shard starting inside a row group reads its own rows
    (offset from the first group it reads), each input once, in order."""
    src = _parquet(tmp_path / "src", labels=list(range(10)), row_group_size=4)
    assert pq.ParquetFile(src / "train-00000-of-00001.parquet").metadata.num_row_groups == 3
    s = _run(_cfg(src, tmp_path / "out", tokenizers["A"], rows_per_shard=6))
    assert s["complete"] and s["reconciled"] and (s["inputs_seen"], s["inputs_written"]) == (10, 10)
    assert _sources(tmp_path / "out") == [f"train-00000-of-00001.parquet#{i}" for i in range(10)]
    assert load_tokens(str(tmp_path / "out"))["label"].tolist() == list(range(10))  # the rows' own data, not just names


def test_settings_fingerprint_changes_with_every_setting():
    """Each setting that decides a shard's content changes the fingerprint; an equal config does not."""
    tok = {"weights_sha256": "w"}

    def fp(**kw):
        return settings_fingerprint(PretokenizeConfig(source="s", format="imagenet", out="o", tokenizer="t", **kw), tok)

    base = fp()
    assert fp() == base
    changed = [fp(image_size=128), fp(augment="flip"), fp(crop_range=1.2), fp(buckets=((256, 256), (320, 192))),
               fp(min_side=16), fp(max_pixels=10**6), fp(target="caption"), fp(columns=Columns(image="jpg")),
               settings_fingerprint(PretokenizeConfig(source="s", format="imagenet", out="o", tokenizer="t"), {"weights_sha256": "v"})]
    assert base not in changed and len(set(changed)) == len(changed)
    # Settings that do not change a shard's content leave it alone.
    assert fp(rows_per_shard=7, num_tokenizers=3, batch_size=5, chunk_size=9) == base


def test_rerun_with_another_augment_rewrites_the_shards(tokenizers, tmp_path):
    """augment none, then flip into the same directory: every shard is redone with two rows per input."""
    src = _parquet(tmp_path / "src", labels=list(range(6)))
    out = tmp_path / "out"
    a = _run(_cfg(src, out, tokenizers["A"]))
    assert a["rows_written"] == 6 and read_manifest(str(out))["n_aug"] == 1
    b = _run(_cfg(src, out, tokenizers["A"], augment="flip"))
    assert b["complete"] and (b["shards_skipped"], b["shards_written"], b["rows_written"]) == (0, 2, 12)
    m = read_manifest(str(out))
    assert m["augment"] == "flip" and m["n_aug"] == 2
    assert pq.read_table(out / m["shards"][0]["file"]).column("aug").to_pylist() == [0, 1] * 4


def test_rerun_after_an_input_is_added_redoes_the_shards_it_moves(tokenizers, tmp_path):
    """A file added to the first class folder shifts every later input to another shard: those shards
    are redone, so the rows are the full sorted listing, each once."""
    train = write_imagenet_folder(tmp_path / "src", n_train=10, n_val=0, size=(40, 36), seed=2) / "train"
    out = tmp_path / "out"
    cfg = PretokenizeConfig(source=str(train), format="imagenet", out=str(out), tokenizer=tokenizers["A"], image_size=SIZE,
                            batch_size=8, rows_per_shard=4)
    first = _run(cfg)
    assert first["complete"] and first["inputs_seen"] == 10
    first_dir = sorted(d for d in train.iterdir() if d.is_dir())[0]
    (first_dir / "aaa_added.JPEG").write_bytes(_jpeg(99))  # sorts first in the first class folder
    second = _run(cfg)
    assert second["complete"] and second["reconciled"] and second["inputs_seen"] == 11
    assert second["shards_written"] == 3  # every shard's inputs changed
    expect = [str(p.relative_to(train)) for p in sorted(train.glob("*/*.JPEG"))]
    assert _sources(out) == expect and len(set(expect)) == 11


def test_custom_parquet_column_names(tokenizers, tmp_path):
    """Parquet with webdataset-style names (jpg / cls / txt) pretokenizes through matching Columns."""
    names = Columns(image="jpg", label="cls", caption="txt")
    src = _parquet(tmp_path / "src", labels=[3, 1, 2], captions=["a", "b", "c"], names=names)
    s = _run(_cfg(src, tmp_path / "lab", tokenizers["A"], columns=names))  # target from the columns: label
    assert s["complete"] and (s["inputs_seen"], s["inputs_written"]) == (3, 3)
    assert load_tokens(str(tmp_path / "lab"))["label"].tolist() == [3, 1, 2]
    c = _run(_cfg(src, tmp_path / "cap", tokenizers["A"], columns=names, target="caption"))
    assert c["complete"] and load_tokens(str(tmp_path / "cap"))["caption"] == ["a", "b", "c"]
