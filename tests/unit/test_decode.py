"""Safe decoding: the hostile corpus, mode conversions, EXIF orientation, pixel limits, downscale."""

from __future__ import annotations

import io
import time
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from pipelines.core import decode as decode_module
from pipelines.core.decode import MAX_SIDE, decode_image, downscale
from pipelines.core.errors import FatalError, RecordError
from pipelines.core.records import DecodedImage
from tests.hostile import (
    BOMB_SIDE,
    corpus,
    grey16_png,
    oriented_jpeg,
    png_bytes,
    write_corpus,
)

LIMIT = 64_000_000
CASES = corpus()
BY_NAME = {case.filename: data for case, data in CASES}


def decode_named(name: str) -> np.ndarray:
    return decode_image(BY_NAME[name], LIMIT).pixels


def reason_of(data: bytes, max_pixels: int = LIMIT) -> str:
    with pytest.raises(RecordError) as caught:
        decode_image(data, max_pixels)
    assert caught.value.stage == "decode"
    return caught.value.reason


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


# The hostile corpus


@pytest.mark.parametrize(("case", "data"), CASES, ids=[case.filename for case, _ in CASES])
def test_hostile_case(case, data):
    if case.decodes:
        image = decode_image(data, LIMIT)
        assert (image.width, image.height) == case.size
        assert image.pixels.dtype == np.uint8 and image.pixels.shape[2] == 3
        assert image.pixels.flags.c_contiguous
    else:
        assert case.reason in reason_of(data)
        assert case.error_stage == "decode"


def test_corpus_has_what_the_ingest_issue_names():
    names = {case.filename for case, _ in CASES}
    required = {
        "empty.jpg", "random.jpg", "truncated.jpg", "bomb.png", "text.jpg", "cmyk.jpg", "grey16.png",
        "palette_transparent.png", "animated.gif", "orientation6.jpg", "tiff_named.png", "svg.jpg",
        "grey.jpg", "rgba.png",
    }  # fmt: skip
    assert required <= names
    assert len(names) == len(CASES)


def test_write_corpus_writes_the_same_bytes(tmp_path):
    cases = write_corpus(tmp_path / "hostile")
    assert [c.filename for c in cases] == [c.filename for c, _ in CASES]
    for case in cases:
        assert (tmp_path / "hostile" / case.filename).read_bytes() == BY_NAME[case.filename]
        assert case.statuses == (("ok", "no_face") if case.decodes else ("error",))
    assert corpus() == CASES  # deterministic


def test_corpus_files_are_tiny():
    assert all(len(data) < 16_384 for _, data in CASES)


def test_reasons_are_short_and_plain():
    for case, data in CASES:
        if not case.decodes:
            reason = reason_of(data)
            assert len(reason) < 120 and reason.isprintable(), reason


# Formats


@pytest.mark.parametrize(
    "data",
    [
        b"8BPS\x00\x01" + bytes(64),  # PSD
        b"\x00\x00\x01\x00\x01\x00" + bytes(64),  # ICO
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"II+\x00" + bytes(16),  # BigTIFF: not in the allow-list
        b"\xff\xd8",  # too short for the JPEG signature
    ],
)
def test_refused_before_pillow_sees_it(data, monkeypatch):
    monkeypatch.setattr(decode_module, "_OPENERS", {})  # a plugin looked up would fail differently
    assert reason_of(data) == "not an allowed image format"


def test_only_the_sniffed_format_plugin_parses():
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    assert reason_of(b"\xff\xd8\xff" + png[3:]).startswith("not a valid JPEG file")
    assert reason_of(b"GIF89a" + png[6:]).startswith("not a valid GIF file")


def test_every_allowed_format_decodes():
    rgb = Image.new("RGB", (20, 10), (200, 100, 50))
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        pixels = decode_image(
            encode(rgb, fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {})), LIMIT
        ).pixels
        assert pixels.shape == (10, 20, 3)
        assert np.abs(pixels.astype(int) - (200, 100, 50)).max() <= 8, fmt


# Modes to 8-bit RGB


def test_cmyk_pure_cyan_is_cyan():
    assert np.abs(decode_named("cmyk.jpg").astype(int) - (0, 255, 255)).max() <= 3


def test_grey_jpeg_is_grey():
    assert np.abs(decode_named("grey.jpg").astype(int) - 100).max() <= 1


def test_16_bit_grey_is_scaled_not_clipped():
    assert (decode_named("grey16.png") == 255).all()
    values = np.array([[0, 257, 32896, 65535, 1000]], np.uint16)
    pixels = decode_image(grey16_png(values), LIMIT).pixels
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255, 4]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_16_bit_rgb():
    assert (decode_named("rgb16.png") == (255, 128, 0)).all()


def test_16_bit_tiff():
    values = np.array([[0, 65535], [32896, 514]], np.uint16)
    pixels = decode_image(encode(Image.fromarray(values), "TIFF"), LIMIT).pixels
    assert pixels[..., 0].tolist() == [[0, 255], [128, 2]]


def test_32_bit_and_float_grey_are_stretched():
    ints = np.array([[-100, 0], [100, 155]], np.int32)  # negative: no 16-bit reading
    assert decode_image(encode(Image.fromarray(ints), "TIFF"), LIMIT).pixels[..., 0].tolist() == [
        [0, 100],
        [200, 255],
    ]
    floats = np.array([[0.0, 0.5], [1.0, np.nan]], np.float32)
    assert decode_image(encode(Image.fromarray(floats), "TIFF"), LIMIT).pixels[..., 0].tolist() == [
        [0, 128],
        [255, 0],
    ]


def test_palette_transparency_is_composited_on_white():
    pixels = decode_named("palette_transparent.png")
    assert (pixels[:, :32] == 255).all()
    assert (pixels[:, 32:] == (255, 0, 0)).all()


def test_rgba_is_composited_on_white():
    pixels = decode_named("rgba.png")
    assert (pixels[:, :21] == 255).all()  # transparent black
    assert (np.abs(pixels[:, 21:42].astype(int) - 127) <= 1).all()  # half-transparent black
    assert (pixels[:, 42:] == (0, 0, 255)).all()  # opaque blue


def test_grey_alpha_and_colour_key_transparency():
    la = np.zeros((4, 4, 2), np.uint8)
    la[:, 2:, 1] = 255  # left half transparent, right half opaque black
    pixels = decode_image(encode(Image.fromarray(la, "LA"), "PNG"), LIMIT).pixels
    assert (pixels[:, :2] == 255).all() and (pixels[:, 2:] == 0).all()
    keyed = Image.new("RGB", (4, 4), (10, 20, 30))
    keyed.paste((0, 0, 0), (0, 0, 2, 4))
    pixels = decode_image(encode(keyed, "PNG", transparency=(0, 0, 0)), LIMIT).pixels
    assert (pixels[:, :2] == 255).all() and (pixels[:, 2:] == (10, 20, 30)).all()


def test_bilevel():
    bits = Image.new("1", (8, 8), 0)
    bits.paste(1, (4, 0, 8, 8))
    pixels = decode_image(encode(bits, "PNG"), LIMIT).pixels
    assert (pixels[:, :4] == 0).all() and (pixels[:, 4:] == 255).all()


def test_animated_gif_gives_its_first_frame():
    assert (decode_named("animated.gif") == (255, 0, 0)).all()


def test_tiff_named_png_decodes():
    assert (decode_named("tiff_named.png") == (0, 255, 0)).all()


# EXIF orientation


def test_orientation_6_turns_the_image_once():
    # Stored 64x48 with red at its top left; shown 48x64 with red at the top right.
    for name in ("orientation6.jpg", "orientation6.tif"):
        pixels = decode_named(name)
        assert pixels.shape == (64, 48, 3), name
        assert np.abs(pixels[4, -5].astype(int) - (255, 0, 0)).max() <= 8, name
        assert np.abs(pixels[4, 4].astype(int) - 128).max() <= 8, name
        assert np.abs(pixels[-5, -5].astype(int) - 128).max() <= 8, name


def test_stored_top_left_pixel_lands_top_right():
    stored = np.full((48, 64, 3), 128, np.uint8)  # 64 wide, 48 high
    stored[:8, :8] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = decode_image(
        encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()), LIMIT
    ).pixels
    assert pixels.shape == (64, 48, 3)
    assert np.abs(pixels[2, 45].astype(int) - (0, 0, 255)).max() <= 8
    assert np.abs(pixels[2, 2].astype(int) - 128).max() <= 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_oriented_jpeg_round_trips(orientation):
    upright = np.full((40, 24, 3), 128, np.uint8)
    upright[:8, :8] = (255, 0, 0)
    upright[-8:, :8] = (0, 255, 0)
    upright[:8, -8:] = (0, 0, 255)
    pixels = decode_image(oriented_jpeg(upright, orientation), LIMIT).pixels
    assert pixels.shape == upright.shape
    assert np.abs(pixels.astype(int) - upright).mean() < 3
    for y, x in ((4, 4), (-4, 4), (4, -4), (-4, -4)):  # the corner blocks
        assert np.abs(pixels[y, x].astype(int) - upright[y, x]).max() <= 8


def test_orientation_is_applied_by_decode_only(monkeypatch):
    calls = []
    real = ImageOps.exif_transpose

    def counting(image, **kwargs):
        calls.append(1)
        return real(image, **kwargs)

    monkeypatch.setattr(decode_module.ImageOps, "exif_transpose", counting)
    decode_named("orientation6.jpg")
    assert len(calls) == 1


# Pixel limits and bombs


def test_bomb_is_rejected_from_the_header_without_loading(monkeypatch):
    def no_load(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail this
        start = time.perf_counter()
        assert reason_of(BY_NAME["bomb.png"]) == f"image {BOMB_SIDE}x{BOMB_SIDE} exceeds {LIMIT} pixels"
        assert "exceeds" in reason_of(BY_NAME["bomb.jpg"])
        assert time.perf_counter() - start < 1
    assert Image.MAX_IMAGE_PIXELS == before


def test_pillow_never_just_warns():
    # Between Pillow's warning (about 89M) and error (about 179M) limits: our limit decides.
    header_only = png_bytes(12_000, 12_000, 8, 0, bytes(12_001))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reason_of(header_only) == f"image 12000x12000 exceeds {LIMIT} pixels"


def test_limit_is_exact():
    data = encode(Image.new("RGB", (64, 48)), "PNG")
    assert decode_image(data, 64 * 48).width == 64
    assert reason_of(data, 64 * 48 - 1) == f"image 64x48 exceeds {64 * 48 - 1} pixels"


def test_absurd_sides():
    assert "side over" in reason_of(png_bytes(MAX_SIDE + 1, 1, 8, 0, bytes(MAX_SIDE + 2)), 10**9)


# Truncation


def _truncation_cases():
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    yield "JPEG", encode(noisy, "JPEG"), 0
    yield "progressive JPEG", encode(noisy, "JPEG", progressive=True), 0
    yield "WEBP", encode(noisy, "WEBP"), 0
    yield "BMP", encode(noisy, "BMP"), 0
    yield "TIFF", encode(noisy, "TIFF"), 0
    # Pixels complete without these last bytes: PNG's zlib checksum, IDAT CRC and IEND; GIF's trailer.
    yield "PNG", encode(noisy, "PNG"), 20
    yield "GIF", encode(noisy, "GIF"), 2


TRUNCATION_CASES = list(_truncation_cases())


@pytest.mark.parametrize(("name", "data", "spare"), TRUNCATION_CASES, ids=[c[0] for c in TRUNCATION_CASES])
def test_every_cut_is_rejected(name, data, spare):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data" on cut TIFF headers
        for end in range(1, len(data) - spare, 7 if len(data) > 3000 else 1):
            with pytest.raises(RecordError):
                decode_image(data[:end], LIMIT)


def test_truncated_jpeg_reason():
    jpeg = encode(Image.new("RGB", (64, 48), (1, 2, 3)), "JPEG")
    assert reason_of(jpeg[:-2]) == "truncated JPEG"  # just the EOI marker gone


def test_eoi_inside_a_thumbnail_does_not_count():
    thumb = encode(Image.new("RGB", (8, 8)), "JPEG")  # carries its own SOS and EOI
    app1 = b"\xff\xe1" + (2 + len(thumb)).to_bytes(2, "big") + thumb
    jpeg = encode(
        Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)), "JPEG"
    )
    with_thumb = jpeg[:2] + app1 + jpeg[2:]
    assert decode_image(with_thumb, LIMIT).width == 64
    assert not decode_module._jpeg_has_end(with_thumb[: len(with_thumb) - 300])


def test_data_after_the_end_is_fine():
    jpeg = encode(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG")
    assert decode_image(jpeg + b"\xff\xda trailer", LIMIT).width == 16


def test_load_truncated_images_must_stay_off(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(FatalError):
        decode_named("grey.jpg")


# Unexpected failures


def test_unexpected_exception_becomes_a_record_error(monkeypatch):
    def boom(image):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(decode_module, "_to_rgb", boom)
    assert reason_of(BY_NAME["grey.jpg"]) == "ValueError: boom"


# Downscale


def image_of(width: int, height: int) -> DecodedImage:
    return DecodedImage(np.zeros((height, width, 3), np.uint8))


@pytest.mark.parametrize("max_side", [0, 64, 100])
def test_downscale_keeps_small_images(max_side):
    image = image_of(64, 48)
    pixels, scale = downscale(image, max_side)
    assert pixels is image.pixels and scale == 1.0


def test_downscale_sizes():
    for width in (1, 2, 3, 7, 64, 99, 100, 101, 333, 1000):
        for height in (1, 5, 64, 150, 999):
            for max_side in (1, 2, 10, 64, 100):
                pixels, scale = downscale(image_of(width, height), max_side)
                longest = max(width, height)
                if longest <= max_side:
                    assert scale == 1.0 and pixels.shape == (height, width, 3)
                    continue
                assert scale == max_side / longest
                h, w = pixels.shape[:2]
                assert max(w, h) == max_side
                assert w == max(1, round(width * scale)) and h == max(1, round(height * scale))
                assert pixels.dtype == np.uint8 and pixels.flags.c_contiguous


def test_downscale_keeps_content():
    pixels = np.zeros((300, 400, 3), np.uint8)
    pixels[:, 200:] = (255, 128, 0)
    small, scale = downscale(DecodedImage(pixels), 100)
    assert small.shape == (75, 100, 3) and scale == 0.25
    assert (small[:, :45] == 0).all() and (small[:, 55:] == (255, 128, 0)).all()


def test_downscale_portrait():
    small, scale = downscale(image_of(480, 640), 100)
    assert small.shape == (100, 75, 3) and scale == 100 / 640


def test_downscale_refuses_negative_sides():
    with pytest.raises(ValueError):
        downscale(image_of(8, 8), -1)
