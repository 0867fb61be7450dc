"""The shard plan: stable ids from sorted listings, labels from folders, files never split oddly (no Ray)."""
import io
import json
import tarfile

import pytest

from maskgil.data.embedded import class_dir_name, write_imagenet_folder, write_parquet
from maskgil.data.sources import InputShard, caption_text, declared_classes, plan_shards, read_shard


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


def _wds_bytes(n):
    """An n-sample tar (k.jpg + k.txt each) and the header offset of every member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for k in range(n):
            for ext, data in (("jpg", b"J%d" % k), ("txt", b"caption %d" % k)):
                info = tarfile.TarInfo(f"{k:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = [m.offset for m in tar]
    return data, offsets


@pytest.mark.parametrize("cut,problem", [
    ("header", "truncated tar after 2 samples: the file ends at a member boundary"),
    ("inside-header", "truncated tar after 2 samples: the file ends inside a member header"),
    ("bad-checksum", "unreadable tar after 2 samples: InvalidHeaderError"),
])
def test_a_tar_cut_before_its_end_marker_is_quarantined(tmp_path, cut, problem):
    """tarfile's stream mode reads a header cut off by the end of the file (or one that does not
    parse) as the end of the archive: the samples after it vanished with nothing quarantined."""
    data, offsets = _wds_bytes(5)
    h = offsets[4]  # header of 0002.jpg, the third sample
    if cut == "header":
        data = data[:h]
    elif cut == "inside-header":
        data = data[:h + 100]
    else:
        data = data[:h] + b"x" * 512 + data[h + 512:]
    (tmp_path / "a.tar").write_bytes(data)
    (shard,) = plan_shards(str(tmp_path), "webdataset")
    recs = list(read_shard(shard))
    assert [(r.source, r.error) for r in recs[:2]] == [("a.tar/0000", None), ("a.tar/0001", None)]
    assert len(recs) == 3 and recs[2].source == "a.tar" and recs[2].data is None
    assert recs[2].error.startswith(problem), recs[2].error


def test_a_whole_tar_has_no_truncation_record(tmp_path):
    data, _ = _wds_bytes(5)
    (tmp_path / "a.tar").write_bytes(data)
    (shard,) = plan_shards(str(tmp_path), "webdataset")
    assert [(r.source, r.caption, r.error) for r in read_shard(shard)] == [(f"a.tar/{k:04d}", f"caption {k}", None) for k in range(5)]


def test_webdataset_json_that_is_not_an_object_is_quarantined(tmp_path):
    _tar(tmp_path / "a.tar", [("k1.jpg", b"J1"), ("k1.json", b"[1, 2]"), ("k2.jpg", b"J2"), ("k2.json", b"null"),
                              ("k3.jpg", b"J3"), ("k3.json", b'{"caption": "fine", "label": 3}')])
    (shard,) = plan_shards(str(tmp_path), "webdataset")
    assert [(r.source, r.caption, r.label, r.error) for r in read_shard(shard)] == [
        ("a.tar/k1", None, None, "json metadata is not an object: list"),
        ("a.tar/k2", None, None, "json metadata is not an object: NoneType"),
        ("a.tar/k3", "fine", 3, None),
    ]


def test_list_captions_give_their_first_non_empty_string(tmp_path):
    """Several captions per image (list<string> column, JSON array): the first non-empty one, never
    the list's Python repr; an empty list is no caption; other values are left for the caller to refuse."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert caption_text(["", "  ", "a dog", "a brown dog"]) == "a dog"
    assert caption_text([]) is None and caption_text(["", None]) is None
    assert caption_text(b"bytes caption") == "bytes caption"
    assert caption_text([1, 2]) == [1, 2] and caption_text({"text": "x"}) == {"text": "x"}
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"image": pa.array([b"I0", b"I1", b"I2"], pa.binary()),
                             "caption": pa.array([["a dog", "a brown dog"], [" ", "cat"], []], pa.list_(pa.string()))}),
                   tmp_path / "pq" / "f.parquet")
    (shard,) = plan_shards(str(tmp_path / "pq"), "parquet")
    assert [r.caption for r in read_shard(shard)] == ["a dog", "cat", None]
    (tmp_path / "wds").mkdir()
    _tar(tmp_path / "wds" / "a.tar", [("k1.jpg", b"J1"), ("k1.json", b'{"caption": ["first", "second"]}')])
    (shard,) = plan_shards(str(tmp_path / "wds"), "webdataset")
    assert [(r.caption, r.error) for r in read_shard(shard)] == [("first", None)]


def test_parquet_class_count_comes_from_hugging_face_features(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"info": {"features": {"image": {"_type": "Image"},
                                      "label": {"names": ["cat", "dog", "fish"], "_type": "ClassLabel"}}}}
    table = pa.table({"image": pa.array([b"I0", b"I1"], pa.binary()), "label": pa.array([2, 3], pa.int64())})
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(features)}), tmp_path / "f.parquet")
    (shard,) = plan_shards(str(tmp_path), "parquet")
    assert [(r.label, r.num_classes) for r in read_shard(shard)] == [(2, 3), (3, 3)]
    assert declared_classes({b"huggingface": b'{"info": {"features": {"label": {"_type": "Value"}}}}'}, "label") is None
    assert declared_classes(None, "label") is None and declared_classes({b"huggingface": b"not json"}, "label") is None


def test_webdataset_extensions_are_case_insensitive(tmp_path):
    """Cameras and Windows tools write .JPG / .TXT / .CLS: those are the sample's image, caption and label."""
    _tar(tmp_path / "a.tar", [("k1.JPG", b"J1"), ("k1.TXT", b"upper"), ("k1.CLS", b"3"), ("k2.Png", b"P2")])
    (shard,) = plan_shards(str(tmp_path), "webdataset")
    recs = list(read_shard(shard))
    assert [(r.source, r.data, r.caption, r.label, r.error) for r in recs] == [
        ("a.tar/k1", b"J1", "upper", 3, None), ("a.tar/k2", b"P2", None, None, None)]


def test_parquet_row_groups_give_each_shard_its_own_rows(tmp_path):
    """Row groups of 4, shards of 6: shard 1 starts inside the second row group and still reads rows 6..9."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": pa.array([b"x%d" % i for i in range(10)]), "label": pa.array(range(10))}),
                   tmp_path / "t.parquet", row_group_size=4)
    plan = plan_shards(str(tmp_path), "parquet", rows_per_shard=6)
    recs = [r for s in plan for r in read_shard(s)]
    assert [(r.source, r.data, r.label) for r in recs] == [(f"t.parquet#{i}", b"x%d" % i, i) for i in range(10)]
