"""Safe decoding of untrusted image bytes into 8-bit RGB pixels, and the downscaled copy for detection.

What ``decode_image`` guarantees, in order:

1. Only the allowed formats, recognised by magic bytes (``formats.sniff_format``), reach Pillow, and
   only the plugin of the sniffed format parses them: PSD, ICO, EPS, SVG and the like are refused
   whatever their file name says.
2. The size is read from the header (opening is lazy) and checked against ``max_pixels`` before a
   single pixel is decoded. Opening goes through the plugin class rather than ``Image.open`` because
   ``Image.open`` applies Pillow's own, global limit (``Image.MAX_IMAGE_PIXELS``): it would warn on
   some images and raise on others without saying their size. That global is left untouched.
3. Only the first frame of an animated GIF, WebP, APNG or a multi-page TIFF is decoded.
4. Truncated files fail: ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False, and a JPEG must carry its
   end-of-image marker after its first scan.
5. The EXIF orientation is applied exactly once; width and height are those of the upright image.
6. A JPEG with more than ``MAX_JPEG_SCANS`` scans is refused before decoding (a CPU bomb).
7. Every mode becomes 8-bit RGB. Alpha is composited on white (what a viewer shows; the colour under
   a transparent pixel is arbitrary, often black). 16-bit and 32-bit grey is scaled to 8 bits, not
   clipped; CMYK and YCbCr go through Pillow's conversions (embedded ICC profiles are ignored).

Every failure is a ``RecordError("decode", reason)`` with a short reason that never holds pixels.
What no check here can catch (a crash or a hang inside a C decoder, memory past the limit) is
contained by the worker process it runs in: see ``isolate.py``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from .errors import FatalError, RecordError
from .formats import HEADER_BYTES, sniff_format
from .records import DecodedImage

# JPEG, WebP and GIF cannot be wider or taller; a PNG, TIFF or BMP that is, is crafted, not a photo.
MAX_SIDE = 65_535
# A camera or encoder writes 1 (baseline) to about 10 scans (progressive). Each scan makes the
# decoder pass over every coefficient again, so thousands of tiny scans on a large image cost
# minutes of CPU: libjpeg-turbo's own tools refuse more than 500 (TJPARAM_SCANLIMIT).
MAX_JPEG_SCANS = 500

# The Pillow plugin that parses each allowed format, and nothing else.
_OPENERS: dict[str, type[ImageFile.ImageFile]] = {
    "jpeg": JpegImagePlugin.JpegImageFile,
    "png": PngImagePlugin.PngImageFile,
    "webp": WebPImagePlugin.WebPImageFile,
    "gif": GifImagePlugin.GifImageFile,
    "bmp": BmpImagePlugin.BmpImageFile,
    "tiff": TiffImagePlugin.TiffImageFile,
}

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """The upright 8-bit RGB pixels of one image's bytes; raises ``RecordError("decode", reason)``."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A global another module may have set; with it Pillow grey-fills truncated files silently.
        raise FatalError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would pass as good")
    if not data:
        raise RecordError("decode", "empty file")
    fmt = sniff_format(data[:HEADER_BYTES])
    if fmt is None:
        raise RecordError("decode", "not an allowed image format")
    try:
        return DecodedImage(_decode(data, fmt, max_pixels))
    except RecordError:
        raise
    except Exception as exc:  # anything Pillow or numpy raises on hostile bytes is this record's failure
        raise RecordError("decode", _describe(exc, fmt)) from exc


def _decode(data: bytes, fmt: str, max_pixels: int) -> np.ndarray:
    opener = _OPENERS[fmt]
    with opener(io.BytesIO(data)) as im:
        if im.format != opener.format:
            raise RecordError("decode", f"sniffed {fmt} but Pillow read {im.format}")
        _check_size(im.size, max_pixels)
        if fmt == "jpeg":
            _check_jpeg(data)
        im.load()  # the current frame, which is the first after opening
        # Recent Pillow's TIFF plugin applies the orientation itself when loading and drops the tag,
        # so this is a no-op there; for every other format (and older Pillow) it is the only time.
        ImageOps.exif_transpose(im, in_place=True)
        return _to_rgb(im)


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise RecordError("decode", f"image {width}x{height} exceeds {max_pixels} pixels")
    if max(width, height) > MAX_SIDE:
        raise RecordError("decode", f"image {width}x{height} has a side over {MAX_SIDE} pixels")
    if min(width, height) < 1:
        raise RecordError("decode", f"image {width}x{height} has no pixels")


def _check_jpeg(data: bytes) -> None:
    if not _jpeg_has_end(data):
        raise RecordError("decode", "truncated JPEG")
    scan = _first_scan_offset(data) or 0
    # 0xFF in entropy-coded data is always followed by 0x00 (stuffed), so each 0xFFDA from the
    # first scan on starts a scan.
    scans = data.count(b"\xff\xda", scan)
    if scans > MAX_JPEG_SCANS:
        raise RecordError("decode", f"JPEG with {scans} scans (limit {MAX_JPEG_SCANS})")


def _jpeg_has_end(data: bytes) -> bool:
    """Whether an EOI marker follows the first scan. Markers are looked for only after the
    header segments, whose payload (an EXIF thumbnail, say) may hold an EOI of its own; inside
    scan data a 0xFF byte is always stuffed, so 0xFFD9 there is the real end."""
    scan = _first_scan_offset(data)
    return scan is not None and data.find(b"\xff\xd9", scan) != -1


def _first_scan_offset(data: bytes) -> int | None:
    """Offset of the first SOS marker, walking the segments from SOI; None if the data ends first."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == 0xDA:
            return pos
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """C-contiguous uint8 (height, width, 3) pixels of any mode."""
    if im.mode in _WIDE_GREY_MODES:
        return _wide_grey_to_rgb(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        im = _on_white(im)
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    return np.array(rgb, dtype=np.uint8)


def _on_white(im: Image.Image) -> Image.Image:
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, im.convert("RGBA"))


def _wide_grey_to_rgb(im: Image.Image) -> np.ndarray:
    """16-bit grey (and 32-bit integers within 16 bits) scaled by 255/65535; anything wider,
    negative or floating stretched from its own minimum to maximum."""
    values = np.asarray(im).astype(np.float32)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scaled: np.ndarray
    if im.mode != "F" and low >= 0 and high <= 65535:
        scaled = values / 257
    elif high > low:
        scaled = (values - low) * (255 / (high - low))
    else:
        scaled = np.zeros_like(values)
    grey = np.rint(np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)).astype(np.uint8)
    return np.repeat(grey[:, :, np.newaxis], 3, axis=2)


def _describe(exc: Exception, fmt: str) -> str:
    """A short reason for an exception raised while decoding."""
    message = str(exc).split("\n", 1)[0][:200]
    if isinstance(exc, OSError) and "truncated" in message:
        return f"truncated {fmt.upper()}"
    if isinstance(exc, MemoryError):  # past the worker's address-space limit (decode.memory_limit_mb)
        return "decoder ran out of memory"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image exceeds Pillow's own limit ({message})"
    if isinstance(exc, SyntaxError):  # how Pillow's plugins say the header is not theirs
        return f"not a valid {fmt.upper()} file ({message})"
    return f"{type(exc).__name__}: {message}"


def downscale(image: DecodedImage, max_side: int) -> tuple[np.ndarray, float]:
    """Pixels whose longest side is at most ``max_side`` (0: no limit), and the scale applied.

    The image itself comes back, unchanged, when it is small enough. Otherwise the longest side
    becomes exactly ``max_side`` and the factor returned is the one applied to it; coordinates
    found on the copy map back to the original by dividing by it.
    """
    if max_side < 0:
        raise ValueError(f"max_side must be >= 0, not {max_side}")
    longest = max(image.width, image.height)
    if max_side == 0 or longest <= max_side:
        return image.pixels, 1.0
    scale = max_side / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap: a fast box reduce by an integer factor first, then the filter on what is left.
    small = Image.fromarray(image.pixels).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.array(small, dtype=np.uint8), scale
