"""The benchmarks' input: the shared photos re-encoded into distinct bytes."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
FACES = REPO.parent / "shared" / "data" / "faces"


def replicate(copies: int, name: str) -> Path:
    """``copies`` re-encodings of each shared photo in ``.bench/<name>-photos-<copies>`` (cached)."""
    folder = REPO / ".bench" / f"{name}-photos-{copies}"
    originals = sorted(FACES.glob("*.jpg"))
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == copies * len(originals):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for photo in originals:
        image = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
        for k in range(copies):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=88 + k)  # another quality: other bytes, same scene
            (folder / f"{photo.stem}-{k}.jpg").write_bytes(buffer.getvalue())
    return folder
