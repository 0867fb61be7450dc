"""The shard plan: stable ids from sorted listings, labels from folders, files never split oddly (no Ray)."""
import io
import tarfile

import pytest

from maskgil.data.embedded import class_dir_name, write_imagenet_folder, write_parquet
from maskgil.data.sources import InputShard, plan_shards, read_shard


def test_imagenet_plan_is_sorted_and_labelled(tmp_path):
    write_imagenet_folder(tmp_path, n_train=40, n_val=0, size=16, seed=0)
    plan = plan_shards(str(tmp_path / "train"), "imagenet", rows_per_shard=16)
    assert [s.shard_id for s in plan] == [0, 1, 2] and [len(s.items) for s in plan] == [16, 16, 8]
    items = [it for s in plan for it in s.items]
    rels = [it[0] for it in items]
    assert rels == sorted(rels)  # class folders are zero-padded, so this is also label order
    for rel, label, size in items:
        assert rel.split("/")[0] == class_dir_name(label) and size == (tmp_path / "train" / rel).stat().st_size
    # Same listing through a file:// URI; fingerprints identical, and they change when an input changes.
    uri_plan = plan_shards(f"file://{tmp_path / 'train'}", "imagenet", rows_per_shard=16)
    assert [s.items for s in uri_plan] == [s.items for s in plan]
    assert [s.fingerprint() for s in uri_plan] == [s.fingerprint() for s in plan]
    first = tmp_path / "train" / rels[0]
    first.write_bytes(first.read_bytes() + b"\0")
    assert plan_shards(str(tmp_path / "train"), "imagenet", 16)[0].fingerprint() != plan[0].fingerprint()
    assert InputShard.from_json(plan[1].to_json()) == plan[1]
    recs = list(read_shard(plan[2]))
    assert [r.index for r in recs] == list(range(8)) and all(r.data and r.error is None for r in recs)


def test_parquet_shards_never_cross_files(tmp_path):
    write_parquet(tmp_path, n=25, size=16, seed=0, num_files=2)  # 12 + 13 rows
    plan = plan_shards(str(tmp_path), "parquet", rows_per_shard=5)
    ranges = [tuple(s.items[0][:3]) for s in plan]
    a, b = "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"
    assert ranges == [(a, 0, 5), (a, 5, 10), (a, 10, 12), (b, 0, 5), (b, 5, 10), (b, 10, 13)]
    recs = list(read_shard(plan[4]))
    assert [r.source for r in recs] == [f"{b}#{i}" for i in range(5, 10)]
    assert all(isinstance(r.label, int) and r.caption for r in recs)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_samples_and_problems(tmp_path):
    _tar(tmp_path / "a.tar", [("k1.jpg", b"J1"), ("k1.txt", b"first"), ("k2.txt", b"no image"), ("k3.png", b"P3"),
                              ("k3.cls", b"7"), ("k1.json", b"{}")])  # k1 comes back after k2, k3: not contiguous
    (tmp_path / "b.tar").write_bytes(b"garbage that is not a tar file" * 40)
    plan = plan_shards(str(tmp_path), "webdataset")
    assert [s.items[0][0] for s in plan] == ["a.tar", "b.tar"]
    recs = list(read_shard(plan[0]))
    assert [(r.source, r.data, r.caption, r.label, r.error) for r in recs] == [
        ("a.tar/k1", b"J1", "first", None, None),
        ("a.tar/k2", None, "no image", None, "no image in sample"),
        ("a.tar/k3", b"P3", None, 7, None),
        ("a.tar/k1", None, None, None, "sample members not contiguous in tar"),
    ]
    (bad,) = list(read_shard(plan[1]))
    assert bad.error.startswith("unreadable tar after 0 samples")


def test_plan_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        plan_shards(str(tmp_path / "missing"), "imagenet")
    (tmp_path / "flat.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="no class folders"):
        plan_shards(str(tmp_path), "imagenet")
    with pytest.raises(ValueError, match="no .parquet files"):
        plan_shards(str(tmp_path), "parquet")
    with pytest.raises(ValueError, match="format must be one of"):
        plan_shards(str(tmp_path), "coco")


def test_parquet_target_follows_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from maskgil.data.pretokenize import PretokenizeConfig

    def cfg(d):
        return PretokenizeConfig(source=str(d), format="parquet", out="unused", tokenizer="unused")

    write_parquet(tmp_path / "labelled", n=4, size=16)
    assert cfg(tmp_path / "labelled").resolved_target() == "label"
    (tmp_path / "captions").mkdir()
    pq.write_table(pa.table({"image": [b"x"], "caption": ["a cat"]}), tmp_path / "captions" / "p.parquet")
    assert cfg(tmp_path / "captions").resolved_target() == "caption"
    (tmp_path / "bare").mkdir()
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "bare" / "p.parquet")
    with pytest.raises(ValueError, match="neither a 'label' nor a 'caption' column"):
        cfg(tmp_path / "bare").resolved_target()
