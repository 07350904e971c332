"""The benchmarks' input: the project's test photos, and copies of them re-encoded into distinct bytes."""

from __future__ import annotations

import io
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "data" / "faces"  # the default; FACEAUDIT_FACES overrides it


def faces_dir(override: str | Path | None = None) -> Path:
    """The photo folder: ``override`` (a script's flag), else $FACEAUDIT_FACES, else tests/data/faces.

    Exits with status 2 and a one-line message when the folder is missing or holds no .jpg photo."""
    folder = Path(override or os.environ.get("FACEAUDIT_FACES") or FACES)
    if not folder.is_dir():
        problem = "the photo folder is missing"
    elif not any(folder.glob("*.jpg")):
        problem = "no .jpg photos in the photo folder"
    else:
        return folder
    print(f"{problem}: {folder} (set FACEAUDIT_FACES to a folder of .jpg photos)", file=sys.stderr)
    raise SystemExit(2)


def replicate(copies: int, name: str) -> Path:
    """``copies`` re-encodings of each photo of ``faces_dir()`` in ``.bench/<name>-photos-<copies>``
    (cached; made again when the source folder or its photos change)."""
    source = faces_dir()
    folder = REPO / ".bench" / f"{name}-photos-{copies}"
    originals = sorted(source.glob("*.jpg"))
    stamp = "\n".join([str(source.resolve()), *(f"{p.name} {p.stat().st_size}" for p in originals)])
    made = folder.with_name(folder.name + ".source")  # what the cached copies were made from
    if (
        made.is_file()
        and made.read_text() == stamp
        and len(list(folder.glob("*.jpg"))) == copies * len(originals)
    ):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    made.unlink(missing_ok=True)
    folder.mkdir(parents=True)
    for photo in originals:
        image = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
        for k in range(copies):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=88 + k)  # another quality: other bytes, same scene
            (folder / f"{photo.stem}-{k}.jpg").write_bytes(buffer.getvalue())
    made.write_text(stamp)
    return folder


def best_of(repeats: int, work: Callable[[], object]) -> float:
    """The fastest of ``repeats`` timings of ``work()``, in seconds: the machine is shared, and the
    minimum is the run least disturbed by other processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)
