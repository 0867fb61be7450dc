"""Per-image decoding, mode conversion, refusal reasons and crops (no Ray)."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from maskgil.data.images import (BadImage, DecodeLimits, Preprocess, decode_image, nearest_bucket, parse_buckets,
                                 resize_crop, ten_crop)


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (PIL cannot write one): IHDR depth 16, colour type 2."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)


def test_rgb_png_is_lossless():
    out = decode_image(_save(Image.fromarray(RGB), "PNG"))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), RGB)


def test_grayscale_replicates_channels():
    g = RNG.integers(0, 256, (40, 48), dtype=np.uint8)
    out = np.asarray(decode_image(_save(Image.fromarray(g, "L"), "PNG")))
    assert out.shape == (40, 48, 3) and all(np.array_equal(out[..., c], g) for c in range(3))


def test_palette_maps_through_palette():
    idx = RNG.integers(0, 4, (40, 48), dtype=np.uint8)
    pal = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette(pal.reshape(-1).tolist())
    assert np.array_equal(np.asarray(decode_image(_save(img, "PNG"))), pal[idx])


def test_sixteen_bit_grey_scales_by_257():
    v = RNG.integers(0, 65536, (40, 48)).astype(np.uint16)
    out = np.asarray(decode_image(_save(Image.fromarray(v), "PNG")))
    expect = np.floor(v / 257 + 0.5).astype(np.uint8)  # 65535 -> 255, 257 -> 1
    assert np.array_equal(out[..., 0], expect) and np.array_equal(out[..., 2], expect)


def test_thirty_two_bit_tiff_scales_by_its_own_white_level():
    """A 32-bit integer TIFF (PIL mode I, like the 16-bit PNGs some readers give) scales by its
    declared depth: signed 32-bit white is 2^31 - 1, so 65535 is near black there, not white."""
    top = 2**31 - 1
    v = np.tile(np.array([0, top, 2**30, 65535, 2**24], dtype=np.int32), (40, 8))
    data = _save(Image.fromarray(v, "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    out = np.asarray(decode_image(data))
    assert out.shape == (40, 40, 3)
    assert out[0, :5, 0].tolist() == [0, 255, 128, 0, 2]  # 2^24 * 255 / (2^31 - 1) = 1.99
    with pytest.raises(BadImage, match="values outside"):
        decode_image(_save(Image.fromarray(np.full((40, 48), -5, np.int32), "I"), "TIFF"))


def test_sixteen_bit_rgb_keeps_the_high_byte():
    v = RNG.integers(0, 65536, (40, 48, 3)).astype(np.uint16)
    out = np.asarray(decode_image(_png16_rgb(v))).astype(int)
    assert out.shape == (40, 48, 3)
    assert np.abs(out - (v.astype(int) >> 8)).max() <= 1


def test_cmyk_jpeg_comes_back_as_the_same_colours():
    flat = np.zeros((40, 48, 3), np.uint8)
    flat[:, :24] = (200, 50, 30)
    flat[:, 24:] = (20, 120, 220)
    data = _save(Image.fromarray(flat).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = np.asarray(decode_image(data)).astype(int)
    assert np.abs(out[5:35, 4:20] - (200, 50, 30)).max() <= 6
    assert np.abs(out[5:35, 28:44] - (20, 120, 220)).max() <= 6


def test_alpha_is_composited_over_white():
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., :3] = (10, 200, 10)  # hidden colour under transparent pixels must not show
    rgba[:, 24:, 3] = 255
    rgba[:, :24, 3] = 0
    out = np.asarray(decode_image(_save(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert (out[:, :24] == 255).all() and (out[:, 24:] == (10, 200, 10)).all()
    half = rgba.copy()
    half[..., 3] = 128  # 50% over white: 255 + (c - 255) * 128/255
    out = np.asarray(decode_image(_save(Image.fromarray(half, "RGBA"), "PNG"))).astype(int)
    assert np.abs(out[0, 0] - np.round(255 + (np.array([10, 200, 10]) - 255) * 128 / 255)).max() <= 1


@pytest.mark.parametrize("mode,key,other", [("RGB", (10, 200, 10), (200, 50, 30)), ("L", 77, 5)])
def test_colour_key_transparency_is_composited_over_white(mode, key, other):
    """An RGB or grey PNG may mark one colour transparent (tRNS chunk): a viewer shows white there,
    so must the decoder; every other colour, the key's neighbours included, stays as it is."""
    shape = (40, 48, 3) if mode == "RGB" else (40, 48)
    arr = np.empty(shape, np.uint8)
    arr[...] = key
    arr[:, 24:] = other
    arr[0, 24] = np.array(key) + 1  # one step from the key: opaque
    out = np.asarray(decode_image(_save(Image.fromarray(arr, mode), "PNG", transparency=key)))
    assert (out[:, :24] == 255).all()
    rgb = np.repeat(arr[..., None], 3, axis=2) if mode == "L" else arr
    assert (out[:, 24:] == rgb[:, 24:]).all()


def test_exif_orientation_is_applied():
    img = Image.fromarray(RGB)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = np.asarray(decode_image(_save(img, "PNG", exif=exif)))
    assert out.shape == (48, 40, 3)
    assert np.array_equal(out, np.rot90(RGB, k=-1))


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"definitely not an image\n" * 10, "not an image"),
    (_save(Image.fromarray(RGB), "JPEG")[:300], "truncated"),
    (_save(Image.fromarray(RGB[:20, :20]), "PNG"), "too small"),
    (_save(Image.new("RGB", (200, 20)), "PNG"), "too small"),  # the short side decides, not the long one
    (_save(Image.fromarray(np.ones((40, 48), np.float32) * 0.5, "F"), "TIFF"), "unsupported mode F"),
])
def test_bad_inputs_name_their_problem(data, reason):
    with pytest.raises(BadImage) as e:
        decode_image(data, DecodeLimits(min_side=32))
    assert e.value.reason.startswith(reason), e.value.reason


def test_too_large_is_refused_from_the_header():
    data = _save(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(BadImage, match="too large: 300x200"):
        decode_image(data, DecodeLimits(max_pixels=300 * 200 - 1))
    assert decode_image(data, DecodeLimits(max_pixels=300 * 200)).size == (300, 200)


def _adm_reference(img: Image.Image, s: int) -> np.ndarray:
    """ADM's centre crop, spelled out step by step for a square target."""
    while min(img.size) >= 2 * s:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.BOX)
    k = s / min(img.size)
    img = img.resize((round(img.size[0] * k), round(img.size[1] * k)), Image.BICUBIC)
    a = np.asarray(img)
    y, x = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
    return a[y:y + s, x:x + s]


# (128, 200) and (256, 128): one side exactly 2x the target, so ADM halves (>=, not >);
# (110, 70): the cover size 100.57 x 64 rounds to 101, where truncating would give 100.
@pytest.mark.parametrize("size", [(300, 200), (200, 300), (64, 64), (50, 90), (1000, 130), (128, 200), (256, 128), (110, 70)])
def test_centre_crop_matches_adm(size):
    img = Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = resize_crop(img, 64, 64)
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out, _adm_reference(img, 64))


def test_centre_crop_takes_the_centre():
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, 100:200] = 255  # the middle third is white: a 100 px square crop is all white
    out = resize_crop(Image.fromarray(a), 100, 100)
    assert (out == 255).all()


def test_ten_crop_positions_and_mirrors():
    # An image already at the big crop size (int(64 * 1.1) = 70) is not resampled, so crops are exact slices.
    a = RNG.integers(0, 256, (70, 70, 3), dtype=np.uint8)
    crops = ten_crop(Image.fromarray(a), 64, 1.1)
    assert len(crops) == 10
    expect = [a[3:67, 3:67], a[:64, :64], a[:64, 6:], a[6:, :64], a[6:, 6:]]
    for k in range(5):
        assert np.array_equal(crops[k], expect[k])
        assert np.array_equal(crops[5 + k], expect[k][:, ::-1])


def test_buckets():
    buckets = parse_buckets("256x256,320x192,192x320")
    assert buckets == ((256, 256), (320, 192), (192, 320))
    assert nearest_bucket(1000, 990, buckets) == (256, 256)
    assert nearest_bucket(1600, 900, buckets) == (320, 192)
    assert nearest_bucket(480, 800, buckets) == (192, 320)
    pre = Preprocess(256, "flip", buckets=buckets)
    crops = pre(Image.fromarray(RNG.integers(0, 256, (90, 160, 3), dtype=np.uint8)))
    assert [c.shape for c in crops] == [(192, 320, 3)] * 2
    assert np.array_equal(crops[1], crops[0][:, ::-1])
    with pytest.raises(ValueError, match="bad bucket"):
        parse_buckets("256")
    with pytest.raises(ValueError, match="ten-crop"):
        Preprocess(256, "ten-crop", buckets=buckets)


@pytest.mark.parametrize("crop_range", [0.9, 0.0, -1.1, float("nan"), float("inf")])
def test_crop_range_below_one_is_refused(crop_range):
    # Below 1 the big centre crop is smaller than a crop: numpy slicing gave clipped corner crops
    # at shifted places (64 px at 0.9: corners (4, 4), (57, 7), ...) instead of an error.
    with pytest.raises(ValueError, match="crop_range must be"):
        Preprocess(64, "ten-crop", crop_range=crop_range)
    with pytest.raises(ValueError, match="crop_range must be"):
        Preprocess(64, "none", crop_range=crop_range)  # a bad value is refused even where ten-crop is off
    with pytest.raises(ValueError, match="crop_range must be"):
        ten_crop(Image.fromarray(RNG.integers(0, 256, (80, 80, 3), dtype=np.uint8)), 64, crop_range)


def test_crop_range_of_one_gives_ten_full_crops():
    crops = Preprocess(64, "ten-crop", crop_range=1.0)(Image.fromarray(RNG.integers(0, 256, (70, 90, 3), dtype=np.uint8)))
    assert [c.shape for c in crops] == [(64, 64, 3)] * 10
    assert all(np.array_equal(c, crops[0]) for c in crops[:5])  # the big crop is the crop: all five coincide


def test_short_side_equal_to_min_side_is_accepted():
    """min_side is the smallest allowed short side: 32x40 passes at min_side 32, 31x40 does not."""
    assert decode_image(_save(Image.new("RGB", (32, 40)), "PNG"), DecodeLimits(min_side=32)).size == (32, 40)
    with pytest.raises(BadImage, match="too small: 31x40"):
        decode_image(_save(Image.new("RGB", (31, 40)), "PNG"), DecodeLimits(min_side=32))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparent_index_is_composited_over_white(fmt):
    """A palette image whose transparent index hides a colour shows white there, as a viewer does."""
    idx = np.zeros((40, 48), np.uint8)
    idx[:, 24:] = 1
    img = Image.fromarray(idx, "P")
    img.putpalette([10, 200, 10, 200, 50, 30] + [0] * 762)
    out = np.asarray(decode_image(_save(img, fmt, transparency=0)))
    assert (out[:, :24] == 255).all() and (out[:, 24:] == (200, 50, 30)).all()


def test_grey_with_alpha_is_composited_over_white():
    """LA: transparent grey pixels become white, opaque ones keep their grey in all three channels."""
    la = np.zeros((40, 48, 2), np.uint8)
    la[..., 0] = 77
    la[:, 24:, 1] = 255
    out = np.asarray(decode_image(_save(Image.fromarray(la, "LA"), "PNG")))
    assert (out[:, :24] == 255).all() and (out[:, 24:] == 77).all()


def test_bilevel_images_are_black_and_white_and_their_key_is_white():
    """Mode "1" converts to black/white RGB; with a tRNS key on black (0) the black pixels show white."""
    bits = np.zeros((40, 48), bool)
    bits[:, 24:] = True
    img = Image.fromarray(bits).convert("1")
    out = np.asarray(decode_image(_save(img, "PNG")))
    assert (out[:, :24] == 0).all() and (out[:, 24:] == 255).all()
    keyed = np.asarray(decode_image(_save(img, "PNG", transparency=0)))
    assert (keyed == 255).all()


def _png_header(w: int, h: int, idat: bytes | None = None) -> bytes:
    """An 8-bit RGB PNG with the given IHDR size and IDAT payload (None: no pixel data at all)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + (chunk(b"IDAT", idat) if idat is not None else b"") + chunk(b"IEND", b""))


@pytest.mark.parametrize("w,h,reason", [
    (20000, 5000, "too large: 20000x5000"),  # over our limit, under 2x PIL's: refused by our header check
    (20000, 20000, "too large: decompression bomb"),  # over 2x PIL's limit: PIL refuses at open
])
def test_oversized_header_is_too_large_not_truncated(w, h, reason):
    """A file that only declares a huge size is refused for its size, before any pixel is read."""
    with pytest.raises(BadImage) as e:
        decode_image(_png_header(w, h))
    assert e.value.reason.startswith(reason), e.value.reason


def test_garbage_pixel_data_is_corrupt():
    """A PNG whose IDAT is not a zlib stream is "corrupt" (not "truncated", not a crash)."""
    garbage = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    with pytest.raises(BadImage) as e:
        decode_image(_png_header(40, 40, garbage))
    assert e.value.reason.startswith("corrupt"), e.value.reason


def test_ten_crop_centre_rounds_an_odd_margin_half_up():
    """32 px crops from int(32 * 1.1) = 35: the margin 3 puts the centre crop at round(1.5) = 2."""
    a = RNG.integers(0, 256, (35, 35, 3), dtype=np.uint8)
    crops = ten_crop(Image.fromarray(a), 32, 1.1)
    assert np.array_equal(crops[0], a[2:34, 2:34]) and np.array_equal(crops[4], a[3:, 3:])
