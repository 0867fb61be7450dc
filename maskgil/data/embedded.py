"""The embedded dataset: procedural shape x colour images with captions, written like real data.

Why it exists: CI and laptops have no ImageNet and no internet, yet the whole pipeline (pretokenize,
train, sample, classify) must run on something a tiny generator can learn in minutes and a small
classifier can judge. 16 classes = 4 shapes x 4 colours, chosen to stay distinct at 64 px and at an
8x8 token grid. Every image is a pure function of (seed, split, index), so any worker can make any
image and two runs make the same bytes.

Nuisance factors by default: position, size (55-70% of the short side, i.e. 4-6 tokens of an 8x8
grid, so a shape is told by which tokens it covers, not by sub-token edge detail) and one of four
grey background shades. Harder variants are a spec away: `rotate=True` (each shape turned within its
symmetry period), `textures=TEXTURES` (gradient, noise and stripes besides plain) and
`max_clutter>0` (small grey marks drawn *under* the object, so they never hide it). The defaults
are the ones a tiny MaskGIL learns shape from in the quickstart's minutes on 2 CPU cores. Measured
in-process (same tokenizer, model and 1,200 steps; share of 8-step samples at CFG 2 of the right
class): objects at 40-60% with rotation, textures and clutter 35-38%; at 55-70% 44%; without
rotation 55%; and with plain backgrounds and no clutter as well (these defaults) 70%.

Captions describe each image in one of several phrasings (CAPTION_TEMPLATES: the full description
half the time, "a red circle"-style short ones otherwise; `caption_style="fixed"` keeps the full one).

Formats written to disk (the ones real data comes in, so the real code paths run):
- ImageNet folder: `<root>/{train,val}/<class_dir>/<name>.JPEG`;
- Parquet (Hugging Face style): `image` struct {bytes, path} (or a binary column), `label`, `caption`;
- WebDataset tars (img2dataset layout): `<key>.jpg`, `<key>.txt` (caption), `<key>.json` (metadata).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # far apart in RGB and in hue; all saturated, unlike the greyish backgrounds
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 215, 40),
}
COLOUR_NAMES = tuple(COLOURS)
# label = shape_index * 4 + colour_index
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES)
NUM_CLASSES = len(CLASS_NAMES)

BACKGROUND_COLOURS = {
    "grey": (128, 128, 128),
    "light grey": (175, 175, 172),
    "dark grey": (72, 72, 76),
    "beige": (178, 166, 146),
}
TEXTURES = ("plain", "gradient", "noisy", "striped")
# Caption phrasings and their weights: the full description half the time, shorter ones otherwise,
# so a text-conditional model learns words, not one sentence template ("fixed" keeps the first).
CAPTION_TEMPLATES = (
    ("a {size} {colour} {shape}{rot} on a {texture} {background} background{clutter}", 5),
    ("a {colour} {shape}", 1),
    ("a {size} {colour} {shape}", 1),
    ("a {colour} {shape} on a {background} background", 1),
    ("{colour} {shape}", 1),
    ("a {shape} in {colour}{rot}, {texture} {background} background{clutter}", 1),
)
CAPTION_STYLES = ("varied", "fixed")
CLUTTER_COLOURS = ((100, 100, 100), (160, 160, 160), (95, 85, 75), (200, 200, 200))

# Shape geometry in units of the object's extent s (see `_shape_polygon`): the radius of the
# smallest centred disc that holds the shape, used to keep every object fully inside the image.
_BOUND_RADIUS = {"circle": 0.5, "square": 0.9 / math.sqrt(2), "triangle": 1.15 / math.sqrt(3), "cross": math.hypot(0.5, 0.18)}
# Area of each shape in units of s^2 (closed form; tests compare rendered pixel counts with it).
SHAPE_AREA = {"circle": math.pi / 4, "square": 0.81, "triangle": math.sqrt(3) / 4 * 1.15**2, "cross": 2 * 0.36 - 0.36**2}
# Rotational symmetry period in degrees: rotations are drawn in [0, period).
_PERIOD = {"circle": 0, "square": 90, "triangle": 120, "cross": 90}
_SPLITS = {"train": 0, "val": 1, "test": 2}


def class_dir_name(label: int) -> str:
    """Folder name of a class in the ImageNet layout; sorts in label order like ImageNet's wnids."""
    return f"{label:02d}_" + CLASS_NAMES[label].replace(" ", "_")


@dataclasses.dataclass(frozen=True)
class EmbeddedSpec:
    """What to generate. `aspect_ratios` (w/h), if given, makes each image pick one of them and keep
    the pixel area width*height: the caption-set case with aspect-ratio buckets."""

    seed: int = 0
    split: str = "train"
    width: int = 64
    height: int = 64
    size_range: tuple[float, float] = (0.55, 0.70)  # object extent / short image side
    rotate: bool = False  # turn polygons by a random angle within their symmetry period
    textures: tuple[str, ...] = ("plain",)  # background textures drawn from (any of TEXTURES)
    max_clutter: int = 0  # small grey marks under the object, 0..max_clutter per image
    aspect_ratios: tuple[float, ...] | None = None
    caption_style: str = "varied"  # "varied": CAPTION_TEMPLATES by weight; "fixed": the full one only

    def __post_init__(self):
        if self.caption_style not in CAPTION_STYLES:
            raise ValueError(f"caption_style must be one of {CAPTION_STYLES}, got {self.caption_style!r}")
        if self.split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {self.split!r}")
        if self.width < 8 or self.height < 8:
            raise ValueError(f"image size must be at least 8x8, got {self.width}x{self.height}")
        if not self.textures or any(t not in TEXTURES for t in self.textures):
            raise ValueError(f"textures must be a non-empty subset of {TEXTURES}, got {self.textures!r}")
        if self.max_clutter < 0:
            raise ValueError(f"max_clutter must be >= 0, got {self.max_clutter}")
        lo, hi = self.size_range
        if not 0 < lo <= hi <= 0.7:
            raise ValueError(f"size_range must satisfy 0 < lo <= hi <= 0.7, got {self.size_range}")


@dataclasses.dataclass(frozen=True)
class ImageAttributes:
    """Everything that decides one image; the caption is written from these."""

    label: int
    shape: str
    colour: str
    width: int
    height: int
    extent: float  # object extent s in pixels
    cx: float
    cy: float
    rotation: int  # degrees, counter-clockwise
    texture: str
    background: str
    n_clutter: int
    phrasing: int = 0  # index into CAPTION_TEMPLATES

    @property
    def size_word(self) -> str:
        frac = self.extent / min(self.width, self.height)
        return "small" if frac < 0.60 else "medium" if frac < 0.65 else "large"

    def caption(self) -> str:
        rot = "" if self.shape == "circle" or self.rotation == 0 else f" rotated {self.rotation} degrees"
        clutter = "" if self.n_clutter == 0 else f" with {self.n_clutter} small grey mark{'s' if self.n_clutter > 1 else ''}"
        return CAPTION_TEMPLATES[self.phrasing][0].format(size=self.size_word, colour=self.colour, shape=self.shape,
                                                          rot=rot, texture=self.texture, background=self.background,
                                                          clutter=clutter)


def _rng(spec: EmbeddedSpec, index: int) -> np.random.Generator:
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return np.random.default_rng([spec.seed, _SPLITS[spec.split], index])


def sample_attributes(spec: EmbeddedSpec, index: int) -> ImageAttributes:
    """Draw image `index` of `spec`. Labels cycle 0..15 so any 16 consecutive indices hold each class once."""
    rng = _rng(spec, index)
    label = index % NUM_CLASSES
    shape, colour = SHAPES[label // len(COLOUR_NAMES)], COLOUR_NAMES[label % len(COLOUR_NAMES)]
    w, h = spec.width, spec.height
    if spec.aspect_ratios:
        ar = float(spec.aspect_ratios[rng.integers(len(spec.aspect_ratios))])
        area = spec.width * spec.height
        w, h = max(8, round(math.sqrt(area * ar))), max(8, round(math.sqrt(area / ar)))
    short = min(w, h)
    extent = float(rng.uniform(*spec.size_range)) * short
    r = _BOUND_RADIUS[shape] * extent + 1.0
    cx = float(rng.uniform(r, max(r, w - r)))
    cy = float(rng.uniform(r, max(r, h - r)))
    period = _PERIOD[shape]
    rotation = int(rng.integers(period)) if period else 0  # drawn either way: other attributes stay put
    rotation = rotation if spec.rotate else 0
    texture = spec.textures[rng.integers(len(spec.textures))]
    background = tuple(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))]
    n_clutter = int(rng.integers(spec.max_clutter + 1))
    phrasing = 0
    if spec.caption_style == "varied":  # its own stream: the image does not depend on the phrasing
        weights = np.array([wt for _, wt in CAPTION_TEMPLATES], np.float64)
        phrasing = int(np.random.default_rng([spec.seed, _SPLITS[spec.split], index, 2]).choice(
            len(weights), p=weights / weights.sum()))
    return ImageAttributes(label, shape, colour, w, h, extent, cx, cy, rotation, texture, background, n_clutter,
                           phrasing)


def _rotate(points: np.ndarray, degrees: float, cx: float, cy: float) -> list[tuple[float, float]]:
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    # Image y points down, so a counter-clockwise turn on screen flips the sign of the y term.
    x = points[:, 0] * c + points[:, 1] * s
    y = -points[:, 0] * s + points[:, 1] * c
    return [(float(a + cx), float(b + cy)) for a, b in zip(x, y)]


def _shape_polygon(shape: str, s: float) -> np.ndarray:
    """Vertices (centred at the origin) of the polygon shapes, for an object extent s."""
    if shape == "square":
        a = 0.45 * s
        return np.array([[-a, -a], [a, -a], [a, a], [-a, a]])
    if shape == "triangle":
        side = 1.15 * s
        rc = side / math.sqrt(3)  # circumradius; the centroid sits at the origin
        ang = np.radians([90, 210, 330])
        return np.stack([rc * np.cos(ang), -rc * np.sin(ang)], axis=1)
    if shape == "cross":
        a, t = 0.5 * s, 0.18 * s
        return np.array([[-t, -a], [t, -a], [t, -t], [a, -t], [a, t], [t, t], [t, a], [-t, a], [-t, t], [-a, t], [-a, -t], [-t, -t]])
    raise ValueError(f"not a polygon shape: {shape}")


def _background(attrs: ImageAttributes, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 background: a grey-ish base with a low-contrast texture (vectorised)."""
    h, w = attrs.height, attrs.width
    base = np.array(BACKGROUND_COLOURS[attrs.background], np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if attrs.texture == "plain":
        delta = np.zeros((h, w), np.float32)
    elif attrs.texture == "gradient":
        t = rng.uniform(0, 2 * math.pi)
        proj = (xx * math.cos(t) + yy * math.sin(t)) / max(h, w)
        delta = 36.0 * (proj - proj.mean())
    elif attrs.texture == "noisy":
        coarse = rng.normal(0, 1, (max(2, h // 8), max(2, w // 8))).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))
        delta = 10.0 * smooth + rng.normal(0, 3, (h, w)).astype(np.float32)
    else:  # striped
        t = rng.uniform(0, math.pi)
        period = rng.uniform(0.10, 0.20) * min(h, w)
        proj = xx * math.cos(t) + yy * math.sin(t)
        delta = 14.0 * np.sign(np.sin(2 * math.pi * proj / period))
    return base[None, None, :] + delta[..., None]


def _supersample(w: int, h: int) -> int:
    side = max(w, h)
    return 4 if side <= 128 else 2 if side <= 512 else 1


def _mask(size: tuple[int, int], ss: int, draw_fn) -> np.ndarray:
    """Anti-aliased coverage in [0, 1]: draw at ss x resolution, box-filter down."""
    w, h = size
    m = Image.new("L", (w * ss, h * ss), 0)
    draw_fn(ImageDraw.Draw(m), ss)
    if ss > 1:
        m = m.resize((w, h), Image.BOX)
    return np.asarray(m, np.float32) / 255.0


def render(attrs: ImageAttributes, rng: np.random.Generator) -> Image.Image:
    """Draw the image described by `attrs`. `rng` supplies only texture/clutter/colour jitter."""
    w, h = attrs.width, attrs.height
    ss = _supersample(w, h)
    img = _background(attrs, rng)

    # Clutter: short strokes and dots, small (<= 12% of the short side), greyish, under the object.
    if attrs.n_clutter:
        short = min(w, h)
        marks = []
        for _ in range(attrs.n_clutter):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            if rng.random() < 0.5:
                ang, ln = rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.12) * short
                marks.append(("line", x, y, x + ln * math.cos(ang), y + ln * math.sin(ang), max(1.0, 0.02 * short)))
            else:
                marks.append(("dot", x, y, rng.uniform(0.015, 0.035) * short))

        def draw_clutter(d: ImageDraw.ImageDraw, k: int):
            for m in marks:
                if m[0] == "line":
                    d.line([(m[1] * k, m[2] * k), (m[3] * k, m[4] * k)], fill=255, width=max(1, round(m[5] * k)))
                else:
                    d.ellipse([(m[1] - m[3]) * k, (m[2] - m[3]) * k, (m[1] + m[3]) * k, (m[2] + m[3]) * k], fill=255)

        cover = _mask((w, h), ss, draw_clutter)[..., None]
        colour = np.array(CLUTTER_COLOURS[rng.integers(len(CLUTTER_COLOURS))], np.float32)
        img = img * (1 - cover) + colour * cover

    # The object.
    s = attrs.extent

    def draw_object(d: ImageDraw.ImageDraw, k: int):
        if attrs.shape == "circle":
            r = 0.5 * s
            d.ellipse([(attrs.cx - r) * k, (attrs.cy - r) * k, (attrs.cx + r) * k, (attrs.cy + r) * k], fill=255)
        else:
            pts = _rotate(_shape_polygon(attrs.shape, s), attrs.rotation, attrs.cx, attrs.cy)
            d.polygon([(x * k, y * k) for x, y in pts], fill=255)

    cover = _mask((w, h), ss, draw_object)[..., None]
    colour = np.array(COLOURS[attrs.colour], np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
    img = img * (1 - cover) + colour * cover
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


def make_image(spec: EmbeddedSpec, index: int) -> tuple[Image.Image, int, str]:
    """Image `index` of `spec` as (PIL RGB image, label, caption); deterministic in (seed, split, index)."""
    attrs = sample_attributes(spec, index)
    # A second stream for rendering noise, so attribute draws never shift when rendering changes.
    rng = np.random.default_rng([spec.seed, _SPLITS[spec.split], index, 1])
    return render(attrs, rng), attrs.label, attrs.caption()


def make_dataset(spec: EmbeddedSpec, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images start..start+n-1 as (uint8 (n, H, W, 3), int64 labels (n,), captions).

    Needs a fixed size (no `aspect_ratios`): used to train/check classifiers and tiny generators in memory.
    """
    if spec.aspect_ratios:
        raise ValueError("make_dataset stacks images into one array: use a spec without aspect_ratios")
    images = np.empty((n, spec.height, spec.width, 3), np.uint8)
    labels = np.empty(n, np.int64)
    captions = []
    for i in range(n):
        img, labels[i], cap = make_image(spec, start + i)
        images[i] = np.asarray(img)
        captions.append(cap)
    return images, labels, captions


# ---------------------------------------------------------------------------------------------
# Writers: the three on-disk layouts real data comes in.


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    w, h = size
    return int(w), int(h)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_imagenet_folder(root: str | os.PathLike, n_train: int, n_val: int, size: int | Sequence[int] = 64,
                          seed: int = 0, quality: int = 95, options: dict | None = None) -> Path:
    """`<root>/train/<class_dir>/train_<index>.JPEG` and the same for `val/`. Returns root.
    `options`: more EmbeddedSpec fields (rotate, textures, max_clutter, size_range) for every writer."""
    root = Path(root)
    w, h = _size(size)
    for split, n in (("train", n_train), ("val", n_val)):
        spec = EmbeddedSpec(seed=seed, split=split, width=w, height=h, **(options or {}))
        for label in range(NUM_CLASSES):
            (root / split / class_dir_name(label)).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, label, _ = make_image(spec, i)
            (root / split / class_dir_name(label) / f"{split}_{i:08d}.JPEG").write_bytes(_jpeg(img, quality))
    return root


def write_parquet(path: str | os.PathLike, n: int, size: int | Sequence[int] = 64, seed: int = 0, split: str = "train",
                  num_files: int = 1, image_column: str = "struct", aspect_ratios: Sequence[float] | None = None,
                  quality: int = 95, options: dict | None = None) -> list[Path]:
    """Hugging Face style Parquet: `<path>/<split>-0000i-of-0000n.parquet`.

    image_column="struct": `image` is {bytes: binary, path: string} (what `datasets` writes for
    Image features); "binary": `image` is the JPEG bytes. Both have `label` (int64) and `caption`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if image_column not in ("struct", "binary"):
        raise ValueError(f"image_column must be 'struct' or 'binary', got {image_column!r}")
    w, h = _size(size)
    spec = EmbeddedSpec(seed=seed, split=split, width=w, height=h, aspect_ratios=tuple(aspect_ratios) if aspect_ratios else None,
                        **(options or {}))
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, num_files + 1).astype(int)
    files = []
    for f in range(num_files):
        names, blobs, labels, captions = [], [], [], []
        for i in range(bounds[f], bounds[f + 1]):
            img, label, cap = make_image(spec, i)
            names.append(f"{split}_{i:08d}.jpg")
            blobs.append(_jpeg(img, quality))
            labels.append(label)
            captions.append(cap)
        if image_column == "struct":
            image = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), pa.array(names, pa.string())], ["bytes", "path"])
        else:
            image = pa.array(blobs, pa.binary())
        table = pa.table({"image": image, "label": pa.array(labels, pa.int64()), "caption": pa.array(captions, pa.string())})
        file = out / f"{split}-{f:05d}-of-{num_files:05d}.parquet"
        pq.write_table(table, file)
        files.append(file)
    return files


def write_webdataset(directory: str | os.PathLike, n: int, size: int | Sequence[int] = 64, seed: int = 0, split: str = "train",
                     shard_size: int = 1000, aspect_ratios: Sequence[float] | None = None, quality: int = 95,
                     options: dict | None = None) -> list[Path]:
    """img2dataset-style tars `<dir>/00000.tar` holding `<key>.jpg`, `<key>.txt` (caption), `<key>.json`.

    Keys are `<shard:05d><index-in-shard:04d>` like img2dataset's; the json carries key, caption,
    label, width, height and status.
    """
    w, h = _size(size)
    spec = EmbeddedSpec(seed=seed, split=split, width=w, height=h, aspect_ratios=tuple(aspect_ratios) if aspect_ratios else None,
                        **(options or {}))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    digits = max(4, len(str(shard_size - 1)))
    files = []
    for shard, lo in enumerate(range(0, n, shard_size)):
        file = out / f"{shard:05d}.tar"
        with tarfile.open(file, "w") as tar:
            for j, i in enumerate(range(lo, min(n, lo + shard_size))):
                img, label, cap = make_image(spec, i)
                key = f"{shard:05d}{j:0{digits}d}"
                meta = {"key": key, "caption": cap, "label": label, "width": img.width, "height": img.height,
                        "status": "success", "index": i, "split": split}
                for ext, data in (("jpg", _jpeg(img, quality)), ("txt", cap.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mtime = 0  # deterministic bytes
                    tar.addfile(info, io.BytesIO(data))
        files.append(file)
    return files
