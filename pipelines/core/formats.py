"""Image formats recognised by their magic bytes, never by file name."""

from __future__ import annotations

# Formats the decoder accepts. Anything else is refused before Pillow sees it.
ALLOWED = ("jpeg", "png", "webp", "gif", "bmp", "tiff")

# File name endings that announce an image. A file that ends so but is not one of the allowed
# formats still becomes an ``images`` row (an error); other files in a folder are not images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

HEADER_BYTES = 16


def sniff_format(header: bytes) -> str | None:
    """The allowed format whose signature starts ``header`` (16 bytes suffice), else None."""
    if header.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if header.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "webp"
    if header[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if header.startswith(b"BM"):
        return "bmp"
    if header[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def looks_like_image(name: str, header: bytes) -> bool:
    """Whether a file met in a folder or archive is an image occurrence (good or bad)."""
    return sniff_format(header) is not None or name.lower().endswith(IMAGE_SUFFIXES)
