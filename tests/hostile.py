"""A generated corpus of hostile and odd image files, with what decoding must make of each.

Tests of every layer import it: ``write_corpus(folder)`` writes the files and returns one
``HostileCase`` per file; ``corpus()`` gives the same cases with their bytes, written nowhere.
What is hostile as a source rather than as bytes (a gzip bomb of a tar, a symlink loop, a 0-byte
tar, a server that never answers) has builders of its own at the end.
Files are 64x48 (or thereabouts) and a few kilobytes at most. Whether an image that decodes has a
face is not known (none of them has one), so a case says ``decodes``, not a final status:
an ``images`` row of it has status ``ok`` or ``no_face`` when it decodes, else ``error`` at
``error_stage``.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 64, 48
BOMB_SIDE = 50_000  # the PNG that claims 50000x50000
JPEG_BOMB_SIDE = 60_000  # JPEG sides stop at 65535
JPEG_MAX_BOMB_SIDE = 65_500
SCAN_BOMB_SCANS = 3000  # a progressive JPEG with this many scans

# The inverse of what ImageOps.exif_transpose applies for each EXIF orientation.
_STORE_FOR_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


class HostileCase(NamedTuple):
    filename: str
    decodes: bool
    error_stage: str | None  # "decode" for every file that must fail, else None
    size: tuple[int, int] | None = None  # (width, height) after EXIF orientation, when it decodes
    reason: str | None = None  # a part of the error reason, when it fails

    @property
    def statuses(self) -> tuple[str, ...]:
        """The ``images`` statuses its row may have."""
        return ("ok", "no_face") if self.decodes else ("error",)


def write_corpus(folder: str | Path) -> list[HostileCase]:
    """Write every hostile file into ``folder`` (created if need be) and return the cases."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for case, data in corpus():
        (folder / case.filename).write_bytes(data)
        cases.append(case)
    return cases


def corpus() -> list[tuple[HostileCase, bytes]]:
    """Every case with its bytes; the same bytes on every call."""
    return [*_refused(), *_broken(), *_odd_but_good()]


def _bad(filename: str, reason: str, data: bytes) -> tuple[HostileCase, bytes]:
    return HostileCase(filename, False, "decode", reason=reason), data


def _good(filename: str, size: tuple[int, int], data: bytes) -> tuple[HostileCase, bytes]:
    return HostileCase(filename, True, None, size=size), data


def _refused() -> list[tuple[HostileCase, bytes]]:
    """Files that are no allowed image format, whatever their names say."""
    not_allowed = "not an allowed image format"
    random_bytes = b"\x00" + np.random.default_rng(7).integers(0, 256, 4095, dtype=np.uint8).tobytes()
    svg = (
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48">'
        b'<rect width="64" height="48" fill="red"/></svg>\n'
    )
    psd = b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 3, HEIGHT, WIDTH, 8, 3) + bytes(64)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\nnewpath 0 0 moveto showpage\n"
    return [
        _bad("empty.jpg", "empty file", b""),
        _bad("random.jpg", not_allowed, random_bytes),
        _bad("text.jpg", not_allowed, b"This is not an image.\n" * 8),
        _bad("svg.jpg", not_allowed, svg),
        _bad("eps.jpg", not_allowed, eps),
        _bad("psd.jpg", not_allowed, psd),
        _bad("icon.jpg", not_allowed, _encode(_gradient(), "ICO")),
    ]


def _broken() -> list[tuple[HostileCase, bytes]]:
    """Allowed formats by their magic bytes that must still fail."""
    jpeg = _encode(_gradient(), "JPEG", quality=90)
    return [
        _bad("truncated.jpg", "truncated JPEG", jpeg[: len(jpeg) * 6 // 10]),
        _bad("truncated.png", "truncated PNG", _truncated_png()),
        _bad("bomb.png", f"image {BOMB_SIDE}x{BOMB_SIDE} exceeds", _png_bomb()),
        _bad("bomb.jpg", f"image {JPEG_BOMB_SIDE}x{JPEG_BOMB_SIDE} exceeds", _jpeg_bomb(jpeg)),
        _bad(
            "bomb65500.jpg",
            f"image {JPEG_MAX_BOMB_SIDE}x{JPEG_MAX_BOMB_SIDE} exceeds",
            _jpeg_bomb(jpeg, JPEG_MAX_BOMB_SIDE),
        ),
        _bad("zero.png", "not a valid PNG", png_bytes(0, 0, 8, 0, b"\x00")),
        _bad("garbage.png", "not a valid PNG", b"\x89PNG\r\n\x1a\n" + b"?" * 64),
    ]


def _odd_but_good() -> list[tuple[HostileCase, bytes]]:
    """Odd files that must decode, to 8-bit RGB of the size given."""
    size, turned = (WIDTH, HEIGHT), (HEIGHT, WIDTH)
    rgb = _gradient()
    return [
        _good("cmyk.jpg", size, _encode(Image.new("CMYK", size, (255, 0, 0, 0)), "JPEG")),
        _good("grey.jpg", size, _encode(Image.new("L", size, 100), "JPEG", quality=95)),
        _good("grey16.png", size, grey16_png(np.full((HEIGHT, WIDTH), 65535, np.uint16))),
        _good("rgb16.png", size, _rgb16_png()),
        _good("palette_transparent.png", size, _encode(_palette_half_transparent(), "PNG")),
        _good("rgba.png", size, _encode(rgba_bands(), "PNG")),
        _good("animated.gif", size, _animated_gif()),
        _good("orientation6.jpg", turned, oriented_jpeg(_marked_upright(), 6)),
        _good("orientation6.tif", turned, _oriented_tiff(_marked_upright(), 6)),
        _good("tiff_named.png", size, _encode(Image.new("RGB", size, (0, 255, 0)), "TIFF")),
        _good("photo.webp", size, _encode(rgb, "WEBP", quality=90)),
        _good("photo.bmp", size, _encode(rgb, "BMP")),
    ]


# Builders other tests use too.


def oriented_jpeg(upright: np.ndarray, orientation: int = 6, quality: int = 95) -> bytes:
    """A JPEG that shows ``upright`` (uint8 HxWx3) once its EXIF ``orientation`` is applied.

    The raster is stored the way a camera held sideways stores it: for orientation 6 it is
    ``upright`` turned 90 degrees anticlockwise, WxH instead of HxW. A decoder that ignores the
    tag returns the sideways raster; one that applies it twice turns it the other way.
    """
    stored = Image.fromarray(np.ascontiguousarray(upright, dtype=np.uint8))
    if _STORE_FOR_ORIENTATION[orientation] is not None:
        stored = stored.transpose(_STORE_FOR_ORIENTATION[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    # 4:4:4 chroma, so that colours stay where they were to within a few levels.
    return _encode(stored, "JPEG", quality=quality, subsampling=0, exif=exif.tobytes())


def grey16_png(values: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG of ``values`` (uint16, HxW)."""
    height, width = values.shape
    return png_bytes(width, height, 16, 0, _rows(values.astype(">u2")))


def rgba_bands() -> Image.Image:
    """RGBA in three vertical bands: transparent black, half-transparent black, opaque blue."""
    pixels = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    third = WIDTH // 3
    pixels[:, third : 2 * third, 3] = 128
    pixels[:, 2 * third :] = (0, 0, 255, 255)
    return Image.fromarray(pixels)


def _marked_upright() -> np.ndarray:
    """An upright 48x64 (WxH) grey raster, red in its top-right 16x16 corner: the corner that a
    sideways-stored orientation-6 raster has at its top left."""
    pixels = np.full((WIDTH, HEIGHT, 3), 128, np.uint8)
    pixels[:16, -16:] = (255, 0, 0)
    return pixels


def _gradient() -> Image.Image:
    x = np.linspace(0, 255, WIDTH, dtype=np.float32)
    y = np.linspace(0, 255, HEIGHT, dtype=np.float32)[:, None]
    pixels = np.stack(
        [
            np.broadcast_to(x, (HEIGHT, WIDTH)),
            np.broadcast_to(y, (HEIGHT, WIDTH)),
            np.full((HEIGHT, WIDTH), 96, np.float32),
        ],
        axis=2,
    )
    return Image.fromarray(pixels.astype(np.uint8))


def _palette_half_transparent() -> Image.Image:
    """Palette image: left half index 0 (black, fully transparent), right half index 1 (red)."""
    indices = np.zeros((HEIGHT, WIDTH), np.uint8)
    indices[:, WIDTH // 2 :] = 1
    im = Image.frombytes("P", (WIDTH, HEIGHT), indices.tobytes())
    im.putpalette([0, 0, 0, 255, 0, 0])
    im.info["transparency"] = 0
    return im


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (WIDTH, HEIGHT), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def _oriented_tiff(upright: np.ndarray, orientation: int) -> bytes:
    stored = Image.fromarray(upright).transpose(_STORE_FOR_ORIENTATION[orientation])
    return _encode(stored, "TIFF", tiffinfo={0x0112: orientation})


def _rgb16_png() -> bytes:
    """16-bit RGB: (65535, 32896, 0) everywhere, 8-bit (255, 128, 0)."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint16)
    pixels[:] = (65535, 32896, 0)
    return png_bytes(WIDTH, HEIGHT, 16, 2, _rows(pixels.astype(">u2")))


def _png_bomb() -> bytes:
    """A valid-looking PNG whose header claims 50000x50000 grey pixels, with one row of data."""
    return png_bytes(BOMB_SIDE, BOMB_SIDE, 8, 0, bytes(1 + BOMB_SIDE))


def _jpeg_bomb(jpeg: bytes, side: int = JPEG_BOMB_SIDE) -> bytes:
    """A real JPEG whose frame header (SOF0) is patched to claim side x side."""
    sof = jpeg.index(b"\xff\xc0")
    dims = struct.pack(">HH", side, side)  # height, then width
    return jpeg[: sof + 5] + dims + jpeg[sof + 9 :]


def _truncated_png() -> bytes:
    """A PNG cut in the middle of its pixel data."""
    rows = np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    data = png_bytes(WIDTH, HEIGHT, 8, 0, _rows(rows))
    return data[: len(data) * 6 // 10]


def _rows(pixels: np.ndarray) -> bytes:
    """PNG scanlines of an HxW or HxWxC array already in PNG byte order: filter byte 0, then the row."""
    rows = pixels.reshape(pixels.shape[0], -1).view(np.uint8)
    return np.hstack([np.zeros((rows.shape[0], 1), np.uint8), rows]).tobytes()


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, scanlines: bytes) -> bytes:
    """A PNG built by hand with the header as given (Pillow would not write some of these);
    ``scanlines`` as ``_rows`` makes them, or anything for a header-only bomb."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunks = [(b"IHDR", header), (b"IDAT", zlib.compress(scanlines, 9)), (b"IEND", b"")]
    body = b"".join(_png_chunk(kind, payload) for kind, payload in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _encode(im: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


def scan_bomb_jpeg(scans: int = SCAN_BOMB_SCANS) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has ``scans`` scans. Each scan makes
    a decoder pass over every coefficient again: on a large image, a CPU bomb in a small file.
    Not in ``corpus()``, whose files stay under 16 KB: 3000 scans take 168 KB."""
    jpeg = _encode(_gradient(), "JPEG", quality=90, progressive=True)
    starts = [i for i in range(len(jpeg) - 1) if jpeg[i : i + 2] == b"\xff\xda"]
    last = jpeg[starts[-1] : -2]  # the last scan: its SOS segment and its data, up to EOI
    return jpeg[:-2] + last * (scans - len(starts)) + b"\xff\xd9"


# ---------------------------------------------------------------- hostile sources


def write_gzip_bomb_tar(path: str | Path, member_mb: int = 256) -> int:
    """A .tar.gz of one member, ``bomb.jpg``, of ``member_mb`` MiB of zeros: about 1 KiB of file
    per MiB of member. Built without compressing the zeros: after a full flush, deflate starts
    afresh, so every further MiB of zeros compresses to the same bytes, which are repeated;
    the gzip trailer (CRC-32, size) is then computed for the whole stream. Returns the file size."""
    mib = bytes(1 << 20)
    info = tarfile.TarInfo("bomb.jpg")
    info.size = (member_mb - 1) << 20  # the last MiB of zeros ends the archive (zero blocks)
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip wrapper
    head = deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)
    first = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.flush(zlib.Z_FINISH)[:-8]  # the final empty block, without the trailer
    crc = zlib.crc32(header)
    for _ in range(member_mb):
        crc = zlib.crc32(mib, crc)
    size = (len(header) + (member_mb << 20)) & 0xFFFFFFFF
    data = head + first + again * (member_mb - 1) + tail + struct.pack("<II", crc, size)
    Path(path).write_bytes(data)
    return len(data)


def write_symlink_loops(folder: str | Path) -> list[str]:
    """``loop.jpg`` linking to itself (listed, since its name says image, and unreadable) and a
    folder link ``loopdir`` to its own parent (which a walk must not follow). Returns the names
    that must each become one error row."""
    folder = Path(folder)
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink(".", folder / "loopdir", target_is_directory=True)
    return ["loop.jpg"]


def write_empty_tar(path: str | Path) -> None:
    Path(path).write_bytes(b"")


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """An http:// URL on 127.0.0.1 whose server accepts connections and never answers: the
    listening socket completes TCP handshakes from its backlog, and nothing ever reads them."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/face.jpg"
