"""The Ray Data pretokenize pipeline end to end on the embedded set (in-process Ray, 2 CPUs)."""
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from maskgil.cluster import init_ray
from maskgil.data.embedded import EmbeddedSpec, class_dir_name, make_image, write_imagenet_folder, write_parquet, write_webdataset
from maskgil.data.images import nearest_bucket
from maskgil.data.pretokenize import PretokenizeConfig, run_pretokenize
from maskgil.data.shards import bucket_grids, is_bucketed, load_tokens, read_manifest, token_dataset
from maskgil.tokenizers import build_tokenizer, load_tokenizer

SIZE = 32  # crop size; the tiny tokenizer downsamples 8x -> 4x4 tokens


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    init_ray("local", num_cpus=2, include_dashboard=False, logging_level="warning")  # as the pipelines start Ray
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer("llamagen-vq-tiny").save_pretrained(d, extra={"name": "llamagen-vq-tiny"})
    return str(d)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet_folder(root, n_train=48, n_val=0, size=(40, 36), seed=7)
    return root / "train"


@pytest.fixture(scope="module")
def imagenet_tokens(ray_local, tokenizer_dir, imagenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    summary = run_pretokenize(_cfg(imagenet, "imagenet", out, tokenizer_dir, rows_per_shard=10), progress=False)
    return out, summary


def _adm(img: Image.Image, s: int) -> np.ndarray:
    """Reference ADM centre crop, independent of maskgil.data.images."""
    while min(img.size) >= 2 * s:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.BOX)
    k = s / min(img.size)
    img = img.resize((round(img.size[0] * k), round(img.size[1] * k)), Image.BICUBIC)
    a = np.asarray(img)
    y, x = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
    return a[y:y + s, x:x + s]


def _cfg(source, fmt, out, tok, **kw):
    kw.setdefault("image_size", SIZE)
    kw.setdefault("batch_size", 8)
    return PretokenizeConfig(source=str(source), format=fmt, out=str(out), tokenizer=tok, **kw)


def _shard_tables(out):
    m = read_manifest(str(out))
    return [pq.read_table(Path(out) / s["file"]) for s in m["shards"]]


def test_round_trip_identical_codes(tokenizer_dir, imagenet, imagenet_tokens, tmp_path):
    a, s = imagenet_tokens
    assert s["complete"] and s["reconciled"]
    assert (s["inputs_seen"], s["inputs_written"], s["inputs_quarantined"], s["rows_written"]) == (48, 48, 0, 48)
    m = read_manifest(str(a))
    assert len(m["shards"]) == 5 and [x["rows"] for x in m["shards"]] == [10, 10, 10, 10, 8]
    assert m["grid"] == [4, 4] and m["codebook_size"] == 512 and m["token_dtype"] == "uint16"
    assert m["tokenizer"]["name"] == "llamagen-vq-tiny" and len(m["tokenizer"]["weights_sha256"]) == 64

    # Rows come in sorted-listing order, labels are the sorted class-folder index.
    tables = _shard_tables(a)
    sources = sum((t.column("source").to_pylist() for t in tables), [])
    files = sorted(imagenet.glob("*/*.JPEG"))
    assert sources == [str(f.relative_to(imagenet)) for f in files]
    labels = sum((t.column("label").to_pylist() for t in tables), [])
    assert labels == [int(f.parent.name.split("_")[0]) for f in files]
    assert all(f.parent.name == class_dir_name(lab) for f, lab in zip(files, labels))

    # Identical codes: tokenize the source images directly (PIL decode + reference crop).
    tok = load_tokenizer(tokenizer_dir)
    direct = tok.encode(np.stack([_adm(Image.open(f).convert("RGB"), SIZE) for f in files]))  # (48, 4, 4)
    got = load_tokens(str(a))
    assert torch.equal(torch.from_numpy(got["tokens"]).view(-1, 4, 4), direct)
    assert torch.equal(tok.decode(torch.from_numpy(got["tokens"]).view(-1, 4, 4)), tok.decode(direct))


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_quarantine_reconciles(ray_local, tokenizer_dir, tmp_path):
    src = tmp_path / "src"
    write_imagenet_folder(src, n_train=32, n_val=0, size=(40, 36), seed=1)
    train = src / "train"
    good = {str(p.relative_to(train)) for p in train.glob("*/*.JPEG")}
    c0, c1 = class_dir_name(0), class_dir_name(1)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 40, 3), dtype=np.uint8))
    jpeg = _bytes(rgb, "JPEG")
    v16 = (np.arange(36 * 40).reshape(36, 40) * 45).astype(np.uint16)
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    converted = {  # decodable after conversion: must be written
        f"{c0}/cmyk.JPEG": _bytes(rgb.convert("CMYK"), "JPEG"),
        f"{c0}/grey16.JPEG": _bytes(Image.fromarray(v16), "PNG"),  # 16-bit PNG with the wrong extension
        f"{c0}/palette.JPEG": _bytes(pal, "GIF"),
        f"{c1}/grey.JPEG": _bytes(rgb.convert("L"), "JPEG"),
        f"{c1}/rgba.png": _bytes(rgb.convert("RGBA"), "PNG"),
    }
    bad = {  # must be quarantined with this reason
        f"{c0}/truncated.JPEG": (jpeg[: len(jpeg) // 3], "truncated"),
        f"{c0}/notes.JPEG": (b"this is a text file\n" * 20, "not an image"),
        f"{c1}/empty.JPEG": (b"", "empty file"),
        f"{c1}/tiny.JPEG": (_bytes(rgb.resize((16, 16)), "JPEG"), "too small"),
        f"{c1}/huge.JPEG": (_bytes(Image.new("RGB", (80, 80), (9, 9, 9)), "JPEG"), "too large"),
        f"{c1}/float.tif": (_bytes(Image.fromarray(np.full((36, 40), 0.5, np.float32), "F"), "TIFF"), "unsupported mode F"),
        "README.txt": (b"stray file outside the class folders", "not inside a class folder"),
    }
    for rel, data in converted.items():
        (train / rel).write_bytes(data)
    for rel, (data, _) in bad.items():
        (train / rel).write_bytes(data)

    out = tmp_path / "out"
    s = run_pretokenize(_cfg(train, "imagenet", out, tokenizer_dir, rows_per_shard=16, max_pixels=3000), progress=False)
    n_in = len(good) + len(converted) + len(bad)
    assert s["complete"] and s["reconciled"]
    assert (s["inputs_seen"], s["inputs_written"], s["inputs_quarantined"]) == (n_in, len(good) + len(converted), len(bad))
    sources = sum((t.column("source").to_pylist() for t in _shard_tables(out)), [])
    assert set(sources) == good | set(converted) and len(sources) == len(set(sources))  # every good image present, each once
    assert load_tokens(str(out))["tokens"].shape == (len(sources), 16)  # one 4x4 row per written input
    q = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in q) == sorted(bad)
    for r in q:
        assert r["reason"].startswith(bad[r["source"]][1]), r

    # The 16-bit grey image was converted correctly: its codes equal those of round(v / 257) replicated.
    tok = load_tokenizer(tokenizer_dir)
    g8 = np.floor(v16 / 257 + 0.5).astype(np.uint8)
    expect = tok.encode(_adm(Image.fromarray(np.repeat(g8[..., None], 3, 2)), SIZE)[None])
    table = next(t for t in _shard_tables(out) if f"{c0}/grey16.JPEG" in t.column("source").to_pylist())
    row = table.column("source").to_pylist().index(f"{c0}/grey16.JPEG")
    assert table.column("tokens")[row].as_py() == expect.view(-1).tolist()


def test_pool_larger_than_the_cluster_is_refused(ray_local, tokenizer_dir, imagenet, tmp_path):
    with pytest.raises(ValueError, match="exceed the cluster's 2 CPUs"):
        run_pretokenize(_cfg(imagenet, "imagenet", tmp_path / "o", tokenizer_dir, num_tokenizers=2), progress=False)


def test_resume_after_a_kill(ray_local, tokenizer_dir, imagenet, imagenet_tokens, tmp_path):
    """Stop after 2 shards, fake what a kill mid-write leaves, rerun: complete, nothing redone, and the
    shards are identical to an uninterrupted run's even with another pool size and batching."""
    out = tmp_path / "out"
    cfg = _cfg(imagenet, "imagenet", out, tokenizer_dir, rows_per_shard=10, num_tokenizers=2, cpus_per_tokenizer=0.5,
               decode_cpus=0.25, batch_size=3, chunk_size=4)
    first = run_pretokenize(PretokenizeConfig(**{**cfg.__dict__, "max_new_shards": 2}), progress=False)
    assert not first["complete"] and first["shards_written"] >= 2
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in (out / "shards").glob("*.done.json"))
    mtimes = {n: (out / "shards" / n.replace(".done.json", ".parquet")).stat().st_mtime_ns for n in done}
    # What a kill mid-write leaves: a temp file, and a shard renamed into place without its record.
    (out / "shards" / ".shard-000004.parquet.tmp-deadbeef").write_bytes(b"half a parquet")
    missing = next(k for k in range(5) if f"shard-{k:06d}.done.json" not in done)
    (out / "shards" / f"shard-{missing:06d}.parquet").write_bytes(b"looks complete by name only")

    second = run_pretokenize(cfg, progress=False)
    assert second["complete"] and second["reconciled"]
    assert second["shards_skipped"] == len(done) and second["shards_written"] == 5 - len(done)
    for n, t in mtimes.items():  # finished shards were not redone
        assert (out / "shards" / n.replace(".done.json", ".parquet")).stat().st_mtime_ns == t
    assert not list((out / "shards").glob(".*"))  # stale temp files removed
    sources = sum((t.column("source").to_pylist() for t in _shard_tables(out)), [])
    expect = sorted(str(f.relative_to(imagenet)) for f in imagenet.glob("*/*.JPEG"))
    assert sorted(sources) == expect and len(sources) == len(set(sources))  # no duplicates, none missing
    for ta, tb in zip(_shard_tables(imagenet_tokens[0]), _shard_tables(out)):
        assert ta.equals(tb)
    # A third run has nothing to do.
    third = run_pretokenize(cfg, progress=False)
    assert third["shards_written"] == 0 and third["shards_skipped"] == 5 and third["inputs_seen"] == 48


def test_parquet_source_with_flip(ray_local, tokenizer_dir, tmp_path):
    write_parquet(tmp_path / "pq", n=20, size=(40, 36), seed=3, num_files=2, image_column="struct")
    s = run_pretokenize(_cfg(tmp_path / "pq", "parquet", tmp_path / "out", tokenizer_dir, rows_per_shard=6, augment="flip"),
                        progress=False)
    assert s["complete"] and (s["inputs_seen"], s["rows_written"]) == (20, 40)
    m = read_manifest(str(tmp_path / "out"))
    assert len(m["shards"]) == 4  # 10 rows per file -> 6 + 4, twice (shards never cross files)
    assert m["augment"] == "flip" and m["n_aug"] == 2
    t = pq.read_table([tmp_path / "out" / x["file"] for x in m["shards"]])
    assert t.column("aug").to_pylist() == [0, 1] * 20
    assert t.column("source").to_pylist()[:4] == ["train-00000-of-00002.parquet#0"] * 2 + ["train-00000-of-00002.parquet#1"] * 2
    spec = EmbeddedSpec(seed=3, width=40, height=36)
    assert t.column("label").to_pylist()[::2] == [make_image(spec, i)[1] for i in range(20)]
    # aug 1 is the mirror image: its codes equal the codes of the flipped crop.
    tok = load_tokenizer(tokenizer_dir)
    img = Image.open(io.BytesIO(pq.read_table(tmp_path / "pq").column("image")[0].as_py()["bytes"])).convert("RGB")
    crop = _adm(img, SIZE)
    expect = tok.encode(np.stack([crop, crop[:, ::-1].copy()]))
    assert t.column("tokens")[0].as_py() == expect[0].view(-1).tolist()
    assert t.column("tokens")[1].as_py() == expect[1].view(-1).tolist()


def test_webdataset_captions_and_buckets(ray_local, tokenizer_dir, tmp_path):
    ratios = (0.6, 1.0, 1.6)
    write_webdataset(tmp_path / "wds", n=18, size=48, seed=4, shard_size=8, aspect_ratios=ratios)
    # A sample whose image is missing (only caption + json) joins the last tar.
    with tarfile.open(tmp_path / "wds" / "00002.tar", "a") as tar:
        for ext, data in (("txt", b"a caption without an image"), ("json", b"{}")):
            info = tarfile.TarInfo(f"000029999.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buckets = ((32, 32), (40, 24), (24, 40))
    s = run_pretokenize(_cfg(tmp_path / "wds", "webdataset", tmp_path / "out", tokenizer_dir, buckets=buckets, min_side=16),
                        progress=False)
    assert s["complete"] and (s["inputs_seen"], s["inputs_written"], s["inputs_quarantined"]) == (19, 18, 1)
    m = read_manifest(str(tmp_path / "out"))
    assert m["grid"] is None and m["target"] == "caption" and len(m["shards"]) == 3
    assert m["buckets"] == [list(b) for b in buckets] and m["tokenizer"]["downsample"] == 8
    assert is_bucketed(str(tmp_path / "out")) and bucket_grids(str(tmp_path / "out")) == [(4, 4), (3, 5), (5, 3)]
    t = pq.read_table([tmp_path / "out" / x["file"] for x in m["shards"]])
    spec = EmbeddedSpec(seed=4, width=48, height=48, aspect_ratios=ratios)
    for src, cap, gh, gw, tokens in zip(*(t.column(c).to_pylist() for c in ("source", "caption", "grid_h", "grid_w", "tokens"))):
        shard, key = src.split(".tar/")
        index = int(shard) * 8 + int(key[5:])
        img, _, caption = make_image(spec, index)
        assert cap == caption
        bw, bh = nearest_bucket(img.width, img.height, buckets)
        assert (gh, gw) == (bh // 8, bw // 8) and len(tokens) == gh * gw
    assert {(a, b) for a, b in zip(t.column("grid_h").to_pylist(), t.column("grid_w").to_pylist())} == {(4, 4), (3, 5), (5, 3)}
    q = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert q == [{"source": "00002.tar/000029999", "reason": "no image in sample", "shard": 2}]
    # Ray Train view of one bucket (as the Train workers read it): only that grid's rows, (B, h*w)
    # tokens and their captions, which the workers turn into text features.
    rows35 = [(c, tok) for c, a, b, tok in zip(*(t.column(k).to_pylist() for k in ("caption", "grid_h", "grid_w", "tokens")))
              if (a, b) == (3, 5)]
    batch = next(iter(token_dataset(str(tmp_path / "out"), grid=(3, 5)).iter_batches(batch_size=64, batch_format="numpy")))
    assert batch["tokens"].shape == (len(rows35), 15) and "label" not in batch
    assert sorted(zip(batch["caption"].tolist(), batch["tokens"].tolist())) == sorted(rows35)


def test_token_dataset_for_ray_train(imagenet_tokens):
    out, _ = imagenet_tokens
    ds = token_dataset(str(out)).materialize()
    batch = next(iter(ds.iter_torch_batches(batch_size=16)))
    assert batch["tokens"].shape == (16, 16) and batch["tokens"].dtype == torch.int64 and batch["label"].shape == (16,)
    rows = ds.take_all()
    assert token_dataset(str(out), grid=(4, 4)).count() == 48  # the grid a trainer asks for
    with pytest.raises(ValueError, match="4x4 token grid, not 8x8"):
        token_dataset(str(out), grid=(8, 8))
    ref = load_tokens(str(out))
    got = sorted((int(r["label"]), tuple(r["tokens"].tolist())) for r in rows)
    assert got == sorted((int(lab), tuple(t)) for lab, t in zip(ref["label"], ref["tokens"].tolist()))
