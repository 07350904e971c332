"""Safe decoding: the hostile corpus, mode conversions, EXIF orientation, pixel limits, downscale.

Expected values are the test's own: images are built here with known pixels, and the files of
the hostile corpus (tests/hostile.py) are checked against tables kept here, never against what
the corpus helper declares about them.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from pipelines.core import decode as decode_module
from pipelines.core.decode import MAX_SIDE, decode_image, downscale
from pipelines.core.errors import FatalError, RecordError
from pipelines.core.records import DecodedImage
from tests.hostile import corpus, grey16_png, png_bytes, write_corpus

LIMIT = 64_000_000
CASES = corpus()
BY_NAME = {case.filename: data for case, data in CASES}
NOT_ALLOWED = "not an allowed image format"


def reason_of(data: bytes, max_pixels: int = LIMIT) -> str:
    with pytest.raises(RecordError) as caught:
        decode_image(data, max_pixels)
    assert caught.value.stage == "decode"
    return caught.value.reason


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


def solid(mode: str, size: tuple[int, int], colour) -> Image.Image:
    return Image.new(mode, size, colour)


def decoded(im: Image.Image, fmt: str, **options) -> np.ndarray:
    return decode_image(encode(im, fmt, **options), LIMIT).pixels


# The hostile corpus: what each file must give, written down here.

REFUSED = {  # file -> the start of its reason
    "empty.jpg": "empty file",
    "random.jpg": NOT_ALLOWED,
    "text.jpg": NOT_ALLOWED,
    "svg.jpg": NOT_ALLOWED,
    "eps.jpg": NOT_ALLOWED,
    "psd.jpg": NOT_ALLOWED,
    "icon.jpg": NOT_ALLOWED,
    "truncated.jpg": "truncated JPEG",
    "truncated.png": "truncated PNG",
    "bomb.png": "image 50000x50000 exceeds 64000000 pixels",
    "bomb.jpg": "image 60000x60000 exceeds 64000000 pixels",
    "bomb65500.jpg": "image 65500x65500 exceeds 64000000 pixels",
    "zero.png": "not a valid PNG file",
    "garbage.png": "not a valid PNG file",
}


DECODES = {  # file -> (width, height) as shown
    "cmyk.jpg": (64, 48),
    "grey.jpg": (64, 48),
    "grey16.png": (64, 48),
    "rgb16.png": (64, 48),
    "palette_transparent.png": (64, 48),
    "rgba.png": (64, 48),
    "animated.gif": (64, 48),
    "orientation6.jpg": (48, 64),  # stored 64 x 48, turned a quarter by its EXIF tag
    "orientation6.tif": (48, 64),
    "tiff_named.png": (64, 48),
    "photo.webp": (64, 48),
    "photo.bmp": (64, 48),
}


@pytest.mark.parametrize(("case", "data"), CASES, ids=[case.filename for case, _ in CASES])
def test_hostile_case(case, data):
    if case.filename in REFUSED:
        assert reason_of(data).startswith(REFUSED[case.filename])
        return
    image = decode_image(data, LIMIT)
    assert (image.width, image.height) == DECODES[case.filename]
    assert image.pixels.shape == (image.height, image.width, 3)
    assert image.pixels.dtype == np.uint8 and image.pixels.flags.c_contiguous


def test_the_tables_and_the_corpus_agree():
    """Every corpus file is in one of the tables above, and the helper's verdicts say the same."""
    assert sorted(BY_NAME) == sorted([*REFUSED, *DECODES])
    for case, _ in CASES:
        assert case.decodes == (case.filename in DECODES), case.filename
        assert case.error_stage == (None if case.decodes else "decode")


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


@pytest.mark.parametrize(
    "cmyk, rgb",
    [
        ((255, 0, 0, 0), (0, 255, 255)),  # pure cyan
        ((0, 255, 255, 0), (255, 0, 0)),  # magenta + yellow: red
        ((0, 0, 0, 0), (255, 255, 255)),  # no ink: white
        ((0, 0, 0, 255), (0, 0, 0)),  # all black
    ],
)
def test_cmyk_jpeg(cmyk, rgb):
    pixels = decoded(solid("CMYK", (16, 8), cmyk), "JPEG", quality=95)
    assert pixels.shape == (8, 16, 3)
    assert np.abs(pixels.astype(int) - rgb).max() <= 3


def test_grey_jpeg_is_grey():
    pixels = decoded(solid("L", (24, 16), 100), "JPEG", quality=95)
    assert pixels.shape == (16, 24, 3)
    assert np.abs(pixels.astype(int) - 100).max() <= 1


def test_16_bit_grey_is_scaled_not_clipped():
    # 8-bit = round(v * 255 / 65535) = round(v / 257): 257 -> 1, 32896 -> 128, 1000 -> 3.89 -> 4
    values = np.array([[0, 257, 32896, 65535, 1000]], np.uint16)
    pixels = decode_image(grey16_png(values), LIMIT).pixels
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255, 4]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    white = decode_image(grey16_png(np.full((3, 5), 65535, np.uint16)), LIMIT).pixels
    assert white.shape == (3, 5, 3) and (white == 255).all()  # full scale is white


def test_16_bit_rgb():
    # 16-bit PNG scanlines built here: big-endian samples, filter byte 0 per row. Every sample is
    # k * 257 (0xkk repeated), the 16-bit form of the 8-bit k, whatever rounding reduces it.
    samples = np.array([[[65535, 32896, 0], [257, 514, 771]]], np.uint16)  # 1 row, 2 pixels
    rows = b"\x00" + samples.astype(">u2").tobytes()
    pixels = decode_image(png_bytes(2, 1, 16, 2, rows), LIMIT).pixels
    assert pixels.tolist() == [[[255, 128, 0], [1, 2, 3]]]


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
    # 6 wide x 2 high: columns 0-1 index 0 (black, fully transparent), 2-5 index 1 (red)
    palette = Image.frombytes("P", (6, 2), bytes([0, 0, 1, 1, 1, 1] * 2))
    palette.putpalette([0, 0, 0, 255, 0, 0])
    pixels = decoded(palette, "PNG", transparency=0)
    assert pixels.shape == (2, 6, 3)
    assert (pixels[:, :2] == 255).all()
    assert (pixels[:, 2:] == (255, 0, 0)).all()


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 3, 4), np.uint8)  # 3 columns: transparent, half-transparent black, opaque blue
    rgba[:, 1, 3] = 128
    rgba[:, 2] = (0, 0, 255, 255)
    pixels = decoded(Image.fromarray(rgba, "RGBA"), "PNG")
    assert (pixels[:, 0] == 255).all()  # transparent black on white: white
    assert (np.abs(pixels[:, 1].astype(int) - 127) <= 1).all()  # 255 * (1 - 128/255) = 127
    assert (pixels[:, 2] == (0, 0, 255)).all()  # opaque blue


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
    frames = [solid("RGB", (10, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    pixels = decode_image(data, LIMIT).pixels
    assert pixels.shape == (6, 10, 3) and (pixels == (255, 0, 0)).all()


def test_the_format_comes_from_the_bytes_not_a_name():
    tiff = encode(solid("RGB", (12, 7), (0, 255, 0)), "TIFF")  # what tiff_named.png holds
    pixels = decode_image(tiff, LIMIT).pixels
    assert pixels.shape == (7, 12, 3) and (pixels == (0, 255, 0)).all()


# EXIF orientation
#
# A stored raster 40 wide x 24 high, grey, with a red 8x8 block at its stored top-left and a blue
# one at its stored top-right. Where each lands when shown, from the EXIF definition of the tag
# (which visual side the stored row 0 and column 0 are):
#   1 row 0 top, col 0 left      red TL, blue TR      5 row 0 left, col 0 top      red TL, blue BL
#   2 row 0 top, col 0 right     red TR, blue TL      6 row 0 right, col 0 top     red TR, blue BR
#   3 row 0 bottom, col 0 right  red BR, blue BL      7 row 0 right, col 0 bottom  red BR, blue TR
#   4 row 0 bottom, col 0 left   red BL, blue BR      8 row 0 left, col 0 bottom   red BL, blue TL
# and 5 to 8 show it 24 wide x 40 high.

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (128, 128, 128)
LANDS = {1: ("TL", "TR"), 2: ("TR", "TL"), 3: ("BR", "BL"), 4: ("BL", "BR"),
         5: ("TL", "BL"), 6: ("TR", "BR"), 7: ("BR", "TR"), 8: ("BL", "TL")}  # fmt: skip
CORNER = {"TL": (4, 4), "TR": (4, -5), "BL": (-5, 4), "BR": (-5, -5)}  # pixel 4 in from each corner


def stored_raster() -> np.ndarray:
    stored = np.full((24, 40, 3), 128, np.uint8)
    stored[:8, :8] = RED
    stored[:8, -8:] = BLUE
    return stored


def with_orientation(fmt: str, orientation: int) -> bytes:
    im = Image.fromarray(stored_raster())
    if fmt == "TIFF":
        return encode(im, "TIFF", tiffinfo={0x0112: orientation})
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())  # 4:4:4: colours stay put


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_once(fmt, orientation):
    pixels = decode_image(with_orientation(fmt, orientation), LIMIT).pixels
    assert pixels.shape == ((24, 40, 3) if orientation <= 4 else (40, 24, 3))
    red, blue = LANDS[orientation]
    for corner, (y, x) in CORNER.items():
        expected = RED if corner == red else BLUE if corner == blue else GREY
        assert np.abs(pixels[y, x].astype(int) - expected).max() <= 8, (corner, pixels[y, x])


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


def test_orientation_is_applied_by_decode_only(monkeypatch):
    calls = []
    real = ImageOps.exif_transpose

    def counting(image, **kwargs):
        calls.append(1)
        return real(image, **kwargs)

    monkeypatch.setattr(decode_module.ImageOps, "exif_transpose", counting)
    decode_image(with_orientation("JPEG", 6), LIMIT)
    assert len(calls) == 1


# Pixel limits and bombs


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose baseline frame header (SOF0) is patched to claim width x height."""
    jpeg = encode(solid("RGB", (16, 8), (1, 2, 3)), "JPEG")
    sof = jpeg.index(b"\xff\xc0")  # marker, length (2), precision (1), then height, width
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


def test_bomb_is_rejected_from_the_header_without_loading(monkeypatch):
    def no_load(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    before = Image.MAX_IMAGE_PIXELS
    png_bomb = png_bytes(50_000, 50_000, 8, 0, bytes(50_001))  # header: 2.5 Gpx; one row of data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail this
        assert reason_of(png_bomb) == "image 50000x50000 exceeds 64000000 pixels"
        assert reason_of(jpeg_claiming(60_000, 50_000)) == "image 60000x50000 exceeds 64000000 pixels"
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
        decode_image(encode(solid("L", (8, 8), 100), "JPEG"), LIMIT)


# Unexpected failures


def test_unexpected_exception_becomes_a_record_error(monkeypatch):
    def boom(image):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(decode_module, "_to_rgb", boom)
    assert reason_of(encode(solid("L", (8, 8), 100), "JPEG")) == "ValueError: boom"


# Downscale


def image_of(width: int, height: int) -> DecodedImage:
    return DecodedImage(np.zeros((height, width, 3), np.uint8))


@pytest.mark.parametrize("max_side", [0, 64, 100])
def test_downscale_keeps_small_images(max_side):
    image = image_of(64, 48)
    pixels, scale = downscale(image, max_side)
    assert pixels is image.pixels and scale == 1.0


@pytest.mark.parametrize(
    "width, height, max_side, size, scale",
    [
        (400, 300, 100, (100, 75), 0.25),  # 100/400; 300 x 0.25 = 75
        (480, 640, 100, (75, 100), 0.15625),  # portrait: 100/640; 480 x 0.15625 = 75
        (101, 100, 100, (100, 99), 100 / 101),  # 100 x 100/101 = 99.01 -> 99
        (1000, 3, 10, (10, 1), 0.01),  # 3 x 0.01 = 0.03 would be 0 rows: at least 1
        (3, 1000, 2, (1, 2), 0.002),  # 3 x 0.002 = 0.006 -> 1 column
        (333, 150, 64, (64, 29), 64 / 333),  # 150 x 64/333 = 28.83 -> 29
        (999, 999, 1, (1, 1), 1 / 999),
    ],
)
def test_downscale_hand_cases(width, height, max_side, size, scale):
    pixels, got = downscale(image_of(width, height), max_side)
    assert (pixels.shape[1], pixels.shape[0]) == size
    assert got == pytest.approx(scale, rel=1e-12)
    assert pixels.dtype == np.uint8 and pixels.flags.c_contiguous


def test_downscale_properties():
    for width in (1, 2, 3, 7, 64, 99, 100, 101, 333, 1000):
        for height in (1, 5, 64, 150, 999):
            for max_side in (1, 2, 10, 64, 100):
                pixels, scale = downscale(image_of(width, height), max_side)
                h, w = pixels.shape[:2]
                if max(width, height) <= max_side:
                    assert scale == 1.0 and (w, h) == (width, height)
                    continue
                assert max(w, h) == max_side  # the longest side becomes max_side exactly
                assert scale * max(width, height) == pytest.approx(max_side)  # dividing maps back
                assert 1 <= min(w, h) <= max_side and w <= width and h <= height
                # the aspect is kept to within half a pixel of rounding on the shorter side
                if min(width, height) * scale >= 1:
                    assert abs(w * height - h * width) <= max(width, height) / 2 + 1e-9


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
