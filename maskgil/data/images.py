"""Decode one image file safely and preprocess it the way the anchors do (ADM centre crop, ten-crop).

Decoding is per input, in our own code, so one bad file never takes good ones with it: anything
that cannot become a correct RGB image raises `BadImage(reason)` and the caller quarantines it.
What *can* be converted correctly is converted:
- grayscale (L, 1), palette (P), CMYK, YCbCr, HSV -> RGB;
- alpha (RGBA, LA, PA, palette with transparency, and RGB / grey PNGs whose tRNS chunk names one
  transparent colour) -> composited over white (what a viewer shows; a plain `convert("RGB")`
  would reveal whatever colour hides under transparent pixels);
- 16-bit grayscale (I;16*, I) -> 8 bit by v / 257 (exact mapping of 0..65535 onto 0..255);
- EXIF orientation -> applied, so the pixels are upright as the camera meant;
- a wrong file extension does not matter: the format is sniffed from the bytes.
Refused: not an image, truncated data, float images (unknown range), images with a short side
below `min_side` or more than `max_pixels` pixels (checked from the header, before decoding).
"""
from __future__ import annotations

import dataclasses
import io
import math
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class BadImage(ValueError):
    """An input that cannot be turned into a correct RGB image; `reason` is short and stable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    min_side: int = 32
    max_pixels: int = 89_478_485  # PIL's decompression-bomb threshold


_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_DIRECT_MODES = {"L", "1", "CMYK", "YCbCr", "HSV", "RGBX"}


def _over_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def integer_full_scale(img: Image.Image) -> int:
    """The white level of an integer-mode ("I*") image: 65535 for 16-bit files (PNG, 16-bit TIFF:
    modes I;16*, or I from some readers), 2^32 - 1 or 2^31 - 1 for a 32-bit unsigned or signed TIFF
    (mode I), from its BitsPerSample and SampleFormat tags. Read it before any transpose: copies
    lose the file's tags."""
    if img.mode == "I" and getattr(img, "format", None) == "TIFF":
        tags = getattr(img, "tag_v2", {})
        bits = int(tags.get(258, (32,))[0])
        signed = int(tags.get(339, (1,))[0]) == 2
        return (1 << (bits - signed)) - 1
    return 65535


def to_rgb(img: Image.Image, full_scale: int | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB correctly, or raise `BadImage`. `full_scale`: the white level
    of an integer-mode image (`integer_full_scale` of the opened file; default from `img`)."""
    mode = img.mode
    keyed = mode in ("P", "RGB", "L", "1") and "transparency" in img.info  # palette index or colour key
    if mode == "RGB" and not keyed:
        return img
    if mode in _ALPHA_MODES or keyed:
        return _over_white(img)
    if mode == "P":
        return img.convert("RGB")
    if mode in _DIRECT_MODES:
        return img.convert("RGB")
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I (a 32-bit TIFF, or what some readers give 16-bit PNGs)
        full = integer_full_scale(img) if full_scale is None else full_scale
        arr = np.asarray(img).astype(np.int64)
        if arr.min() < 0 or arr.max() > full:
            raise BadImage(f"unsupported mode {mode}: values outside 0..{full}")
        grey = np.floor(arr * (255.0 / full) + 0.5).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    raise BadImage(f"unsupported mode {mode}")


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Bytes -> upright 8-bit RGB PIL image, or raise `BadImage` naming the problem."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # from the header: refuse bombs before decoding pixels
            if w * h > limits.max_pixels:
                raise BadImage(f"too large: {w}x{h} > {limits.max_pixels} pixels")
            if min(w, h) < limits.min_side:
                raise BadImage(f"too small: {w}x{h}, short side < {limits.min_side}")
            img.load()
            full_scale = integer_full_scale(img)
            img = ImageOps.exif_transpose(img)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except Image.DecompressionBombError:
        raise BadImage("too large: decompression bomb") from None
    except Exception as e:  # any decoder failure is this input's problem, never the job's
        msg = str(e).lower()
        kind = "truncated" if ("truncat" in msg or "premature" in msg or isinstance(e, EOFError)) else "corrupt"
        raise BadImage(f"{kind}: {type(e).__name__}: {e}") from None
    return to_rgb(img, full_scale)


# ---------------------------------------------------------------------------------------------
# Crops. All return uint8 arrays (H, W, 3).


def resize_crop(img: Image.Image, width: int, height: int) -> np.ndarray:
    """Cover (width, height) then take the centre: ADM's `center_crop_arr` generalised to rectangles.

    As in ADM: halve with a box filter while both sides stay >= 2x the target (cheap anti-aliasing
    for big images), then one bicubic resize so the image just covers the target, then centre crop.
    For a square target this is exactly ADM's crop.
    """
    while img.width >= 2 * width and img.height >= 2 * height:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = max(width / img.width, height / img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - height) // 2
    left = (arr.shape[1] - width) // 2
    return np.ascontiguousarray(arr[top:top + height, left:left + width])


def ten_crop(img: Image.Image, image_size: int, crop_range: float = 1.1) -> list[np.ndarray]:
    """LlamaGen-style ten-crop: centre-crop to int(image_size * crop_range), then five crops of
    `image_size` (order: centre, top-left, top-right, bottom-left, bottom-right) and their mirrors
    (aug 5 + k is crop k flipped left-right)."""
    check_crop_range(crop_range)
    big = resize_crop(img, int(image_size * crop_range), int(image_size * crop_range))
    H, W = big.shape[:2]
    s = image_size
    ct, cl = int(round((H - s) / 2.0)), int(round((W - s) / 2.0))
    corners = [(ct, cl), (0, 0), (0, W - s), (H - s, 0), (H - s, W - s)]
    crops = [np.ascontiguousarray(big[t:t + s, l:l + s]) for t, l in corners]
    return crops + [np.ascontiguousarray(c[:, ::-1]) for c in crops]


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (w, h) bucket whose aspect ratio is closest in log scale; ties go to the earlier bucket."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


AUGMENTS = {"none": 1, "flip": 2, "ten-crop": 10}


def check_crop_range(crop_range: float) -> None:
    """Ten-crop cuts `image_size` crops out of a square `image_size * crop_range` on a side: below 1
    that square is smaller than a crop and numpy slicing silently returns clipped, misplaced crops."""
    if not (math.isfinite(crop_range) and crop_range >= 1):
        raise ValueError(f"crop_range must be a finite number >= 1 (ten-crop takes crops from a centre crop "
                         f"crop_range times the image size), got {crop_range}")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How an image becomes one or more fixed-size crops (rows). `buckets` (w, h) for caption sets."""

    image_size: int = 256
    augment: str = "none"  # none | flip | ten-crop
    crop_range: float = 1.1
    buckets: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {sorted(AUGMENTS)}, got {self.augment!r}")
        if self.buckets and self.augment == "ten-crop":
            raise ValueError("ten-crop needs a square image size; it cannot be combined with aspect-ratio buckets")
        check_crop_range(self.crop_range)  # for every augment: a bad value is a mistake even where it goes unused

    @property
    def n_aug(self) -> int:
        return AUGMENTS[self.augment]

    def __call__(self, img: Image.Image) -> list[np.ndarray]:
        """RGB image -> crops; list index is the `aug` id stored in the shard."""
        if self.augment == "ten-crop":
            return ten_crop(img, self.image_size, self.crop_range)
        if self.buckets:
            w, h = nearest_bucket(img.width, img.height, self.buckets)
        else:
            w = h = self.image_size
        crop = resize_crop(img, w, h)
        return [crop, np.ascontiguousarray(crop[:, ::-1])] if self.augment == "flip" else [crop]


def parse_buckets(text: str) -> tuple[tuple[int, int], ...]:
    """'256x256,320x192' -> ((256, 256), (320, 192)) as (width, height)."""
    out = []
    for part in text.split(","):
        try:
            w, h = part.lower().strip().split("x")
            out.append((int(w), int(h)))
        except ValueError:
            raise ValueError(f"bad bucket {part!r}: expected WIDTHxHEIGHT, e.g. 320x192") from None
    return tuple(out)
