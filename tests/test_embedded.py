"""The embedded dataset: determinism, balance, captions that tell the truth, and readable formats."""
import io
import json
import math
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.spatial import ConvexHull

from maskgil.data.embedded import (CLASS_NAMES, NUM_CLASSES, EmbeddedSpec, class_dir_name, make_dataset,
                                   make_image, sample_attributes, write_imagenet_folder, write_parquet, write_webdataset)

# Reference colours and geometry written out independently of the module's tables.
REF_COLOURS = {"red": (220, 40, 40), "green": (40, 175, 60), "blue": (45, 85, 225), "yellow": (240, 215, 40)}


def test_sixteen_classes_are_shape_by_colour():
    assert NUM_CLASSES == 16 and len(set(CLASS_NAMES)) == 16
    shapes = {"circle", "square", "triangle", "cross"}
    for name in CLASS_NAMES:
        colour, shape = name.split(" ")
        assert colour in REF_COLOURS and shape in shapes


def test_deterministic_in_seed_split_index():
    spec = EmbeddedSpec(seed=3, width=48, height=40)
    a, la, ca = make_image(spec, 17)
    # Generating other images first must not change image 17.
    for i in range(5):
        make_image(spec, i)
    b, lb, cb = make_image(EmbeddedSpec(seed=3, width=48, height=40), 17)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and la == lb and ca == cb
    assert a.size == (48, 40) and a.mode == "RGB"
    other_seed = np.asarray(make_image(EmbeddedSpec(seed=4, width=48, height=40), 17)[0])
    other_split = np.asarray(make_image(EmbeddedSpec(seed=3, split="val", width=48, height=40), 17)[0])
    assert not np.array_equal(np.asarray(a), other_seed)
    assert not np.array_equal(np.asarray(a), other_split)


def test_class_balance_and_make_dataset():
    images, labels, captions = make_dataset(EmbeddedSpec(width=32, height=32), 160)
    assert images.shape == (160, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=16).tolist() == [10] * 16
    assert len(captions) == 160
    img, label, cap = make_image(EmbeddedSpec(width=32, height=32), 37)
    assert np.array_equal(images[37], np.asarray(img)) and labels[37] == label and captions[37] == cap


def _shape_from_pixels(mask: np.ndarray) -> str:
    """Classify a binary object mask by two rotation-invariant measures.

    compactness = area / r_max^2 (r_max from the centroid): circle pi, square 2.0, cross 2.1, triangle 1.3;
    solidity = area / convex-hull area: 1 for convex shapes, ~0.75 for the plus-shaped cross.
    """
    ys, xs = np.nonzero(mask)
    pts = np.stack([xs, ys], 1).astype(float)
    cx, cy = pts.mean(0)
    area = len(pts)
    r_max = np.sqrt(((pts - [cx, cy]) ** 2).sum(1)).max() + 0.5
    corners = np.concatenate([pts + d for d in ([-.5, -.5], [.5, -.5], [-.5, .5], [.5, .5])])
    solidity = area / ConvexHull(corners).volume
    compact = area / r_max**2
    if solidity < 0.85:
        return "cross"
    if compact > 2.6:
        return "circle"
    if compact < 1.65:
        return "triangle"
    return "square"


HARD = dict(rotate=True, textures=("plain", "gradient", "noisy", "striped"), max_clutter=3, size_range=(0.40, 0.60))


@pytest.mark.parametrize("variant", [{}, HARD], ids=["default", "rotated-textured-cluttered"])
def test_captions_match_pixels(variant):
    """Caption colour and shape are recovered from the pixels by an independent measurement."""
    spec = EmbeddedSpec(seed=1, width=128, height=128, **variant)
    for i in range(48):
        img, label, cap = make_image(spec, i)
        colour, shape = CLASS_NAMES[label].split(" ")
        words = cap.replace(",", "").split(" ")
        assert colour in words and shape in words, cap
        assert not {*REF_COLOURS, "circle", "square", "triangle", "cross"} - {colour, shape} & set(words), cap
        px = np.asarray(img).astype(float)
        # The object is the set of pixels close to the caption's colour.
        dist = {c: np.linalg.norm(px - np.array(rgb), axis=-1) for c, rgb in REF_COLOURS.items()}
        mask = dist[colour] < 45
        # No other object colour is present in a comparable amount.
        for c, d in dist.items():
            if c != colour:
                assert (d < 45).sum() < 0.05 * mask.sum(), (cap, c)
        assert _shape_from_pixels(mask) == shape, (i, cap)
        # Object extent in the spec's band of the short side (hand geometry: area = k * s^2).
        s = sample_attributes(spec, i).extent
        lo, hi = variant.get("size_range", (0.55, 0.70))
        assert lo * 128 <= s <= hi * 128
        k = {"circle": math.pi / 4, "square": 0.81, "triangle": math.sqrt(3) / 4 * 1.15**2, "cross": 2 * 0.36 - 0.36**2}[shape]
        assert abs(mask.sum() - k * s * s) < 0.08 * k * s * s, (cap, mask.sum(), k * s * s)


def test_captions_state_rotation_and_size():
    plain = EmbeddedSpec(seed=2, caption_style="fixed")  # the full description in every caption
    assert all(sample_attributes(plain, i).rotation == 0 for i in range(64))  # default: unrotated
    assert all(" plain " in make_image(plain, i)[2] and "mark" not in make_image(plain, i)[2] for i in range(16))
    spec = EmbeddedSpec(seed=2, caption_style="fixed", **HARD)
    rotated = 0
    for i in range(64):
        a = sample_attributes(spec, i)
        cap = make_image(spec, i)[2]
        if a.shape != "circle" and a.rotation:
            assert f"rotated {a.rotation} degrees" in cap
            rotated += 1
        else:
            assert "rotated" not in cap
        assert cap.split(" ")[1] in ("small", "medium", "large")
    assert rotated > 32
    # Turning rotation on changes nothing else about an image's attributes.
    a, b = sample_attributes(EmbeddedSpec(seed=2, rotate=True), 5), sample_attributes(EmbeddedSpec(seed=2), 5)
    assert (a.cx, a.cy, a.extent, a.background) == (b.cx, b.cy, b.extent, b.background)


def test_caption_phrasings_vary_but_never_change_the_image():
    from maskgil.data.embedded import CAPTION_TEMPLATES

    varied, fixed = EmbeddedSpec(seed=3), EmbeddedSpec(seed=3, caption_style="fixed")
    used = [sample_attributes(varied, i).phrasing for i in range(600)]
    counts = np.bincount(used, minlength=len(CAPTION_TEMPLATES))
    assert (counts > 0).all() and 0.4 < counts[0] / 600 < 0.6  # the full description about half the time
    for i in range(24):
        (a, la, ca), (b, lb, cb) = make_image(varied, i), make_image(fixed, i)
        assert np.array_equal(np.asarray(a), np.asarray(b)) and la == lb
        assert cb == CAPTION_TEMPLATES[0][0].format(size=sample_attributes(fixed, i).size_word,
                                                    colour=CLASS_NAMES[lb].split()[0], shape=CLASS_NAMES[lb].split()[1],
                                                    rot="", texture="plain", background=sample_attributes(fixed, i).background,
                                                    clutter="")
    short = {make_image(varied, i)[2] for i in range(200)}
    assert {"green circle", "a blue square"} <= short  # "colour shape" and "a colour shape" phrasings
    with pytest.raises(ValueError, match="caption_style"):
        EmbeddedSpec(caption_style="poetic")


def test_aspect_ratios_keep_area():
    spec = EmbeddedSpec(width=64, height=64, aspect_ratios=(0.5, 1.0, 2.0))
    sizes = {make_image(spec, i)[0].size for i in range(30)}
    assert sizes == {(45, 91), (64, 64), (91, 45)}  # round(sqrt(4096*r)), round(sqrt(4096/r))


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="split"):
        EmbeddedSpec(split="dev")
    with pytest.raises(ValueError, match="at least 8x8"):
        EmbeddedSpec(width=4)
    with pytest.raises(ValueError, match="textures"):
        EmbeddedSpec(textures=("plain", "marble"))
    with pytest.raises(ValueError, match="max_clutter"):
        EmbeddedSpec(max_clutter=-1)


def _close(jpeg_bytes: bytes, img: Image.Image) -> bool:
    dec = np.asarray(Image.open(io.BytesIO(jpeg_bytes)).convert("RGB")).astype(float)
    # JPEG q95 at 32 px with 4:2:0 chroma costs up to ~5 grey levels on saturated edges; another
    # image of the same class differs by 19 or more (43 on average).
    return dec.shape == np.asarray(img).shape and np.abs(dec - np.asarray(img)).mean() < 7.0


def test_writers_pass_spec_options(tmp_path):
    hard = dict(rotate=True, textures=("striped",), max_clutter=3)
    write_imagenet_folder(tmp_path, n_train=16, n_val=0, size=32, seed=5, options=hard)
    f = sorted((tmp_path / "train").glob("*/*.JPEG"))[3]
    index = int(f.stem.split("_")[1])
    assert _close(f.read_bytes(), make_image(EmbeddedSpec(seed=5, width=32, height=32, **hard), index)[0])
    assert not _close(f.read_bytes(), make_image(EmbeddedSpec(seed=5, width=32, height=32), index)[0])


def test_imagenet_folder(tmp_path):
    write_imagenet_folder(tmp_path, n_train=32, n_val=16, size=32, seed=5)
    for split, n in (("train", 32), ("val", 16)):
        dirs = sorted(p.name for p in (tmp_path / split).iterdir())
        assert dirs == [class_dir_name(i) for i in range(16)]  # sorted folder order == label order
        files = sorted((tmp_path / split).glob("*/*.JPEG"))
        assert len(files) == n
        for f in files:
            assert len(list(f.parent.glob("*.JPEG"))) == n // 16
            idx = int(f.stem.split("_")[1])
            img, label, _ = make_image(EmbeddedSpec(seed=5, split=split, width=32, height=32), idx)
            assert f.parent.name == class_dir_name(label)
            assert _close(f.read_bytes(), img)


@pytest.mark.parametrize("image_column", ["struct", "binary"])
def test_parquet(tmp_path, image_column):
    files = write_parquet(tmp_path, n=40, size=(40, 32), seed=1, num_files=3, image_column=image_column)
    assert [f.name for f in files] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    table = pq.read_table(files)  # a list of files reads as one table
    assert table.num_rows == 40
    assert set(table.column_names) == {"image", "label", "caption"}
    rows = table.to_pylist()
    spec = EmbeddedSpec(seed=1, width=40, height=32)
    for i, row in enumerate(rows):
        img, label, cap = make_image(spec, i)
        blob = row["image"]["bytes"] if image_column == "struct" else row["image"]
        if image_column == "struct":
            assert row["image"]["path"] == f"train_{i:08d}.jpg"
        assert row["label"] == label and row["caption"] == cap
        assert _close(blob, img)


def test_webdataset(tmp_path):
    files = write_webdataset(tmp_path, n=25, size=32, seed=2, shard_size=10, aspect_ratios=(0.75, 1.0))
    assert [f.name for f in files] == ["00000.tar", "00001.tar", "00002.tar"]
    spec = EmbeddedSpec(seed=2, width=32, height=32, aspect_ratios=(0.75, 1.0))
    seen = 0
    for shard, f in enumerate(files):
        with tarfile.open(f) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({n.rsplit(".", 1)[0] for n in members})
        for key in keys:
            assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(members)
            meta = json.loads(members[f"{key}.json"])
            img, label, cap = make_image(spec, meta["index"])
            assert key.startswith(f"{shard:05d}") and meta["key"] == key
            assert members[f"{key}.txt"].decode() == cap == meta["caption"] and meta["label"] == label
            assert (meta["width"], meta["height"]) == img.size
            assert _close(members[f"{key}.jpg"], img)
            seen += 1
    assert seen == 25


def test_cli_writes_each_format(tmp_path):
    from pipelines.make_dataset import main

    main(["imagenet", "--out", str(tmp_path / "in"), "--n-train", "16", "--n-val", "16", "--size", "24"])
    main(["parquet", "--out", str(tmp_path / "pq"), "--n", "8", "--size", "24x16"])
    main(["webdataset", "--out", str(tmp_path / "wds"), "--n", "8", "--size", "24", "--shard-size", "4"])
    assert len(list((tmp_path / "in").glob("*/*/*.JPEG"))) == 32
    assert pq.read_table(tmp_path / "pq").num_rows == 8
    assert len(list((tmp_path / "wds").glob("*.tar"))) == 2
