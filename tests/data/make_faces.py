"""Rebuild tests/data/faces from deepface's unit-test photos (see tests/data/faces/SOURCE.md).

    .venv/bin/python tests/data/make_faces.py SOURCE_FOLDER [--out tests/data/faces]
        [--max-side 800] [--larger NAME=SIDE ...]

Every JPEG of SOURCE_FOLDER is turned upright by its EXIF orientation, downscaled (Lanczos) so that
its long side is at most --max-side pixels (smaller photos keep their size), and saved as JPEG
quality 90 without EXIF, under the same name. --larger gives one photo another limit (for a photo
whose face dlib's HOG detector no longer finds at --max-side). The two CSV files are copied
unchanged. Then every photo is checked with dlib's HOG detector (upsample 1); the script exits
with status 1, naming them, if any has no face.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

OUT = Path(__file__).resolve().parent / "faces"
CSVS = ("master.csv", "face-recognition-pivot.csv")


def reencode(src: Path, dst: Path, max_side: int) -> tuple[int, int]:
    """``src`` upright, at most ``max_side`` px on its long side, as JPEG quality 90 at ``dst``."""
    with Image.open(src) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    image.save(dst, "JPEG", quality=90)
    return image.size


def faceless(folder: Path) -> list[str]:
    """Names of the photos in ``folder`` where dlib's HOG detector (upsample 1) finds no face."""
    import dlib
    import numpy as np

    detector = dlib.get_frontal_face_detector()
    return [
        p.name
        for p in sorted(folder.glob("*.jpg"))
        if len(detector(np.asarray(Image.open(p).convert("RGB")), 1)) == 0
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="deepface's tests/unit/dataset folder")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-side", type=int, default=800)
    parser.add_argument("--larger", nargs="*", default=[], metavar="NAME=SIDE")
    args = parser.parse_args()
    larger = {name: int(side) for name, side in (item.split("=", 1) for item in args.larger)}
    photos = sorted(args.source.glob("*.jpg"))
    if not photos:
        sys.exit(f"no JPEG photos in {args.source}")
    args.out.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        width, height = reencode(photo, args.out / photo.name, larger.get(photo.name, args.max_side))
        print(f"{photo.name}: {width}x{height}")
    for name in CSVS:
        shutil.copyfile(args.source / name, args.out / name)
    missing = faceless(args.out)
    if missing:
        sys.exit(f"no face found by dlib's HOG detector in: {', '.join(missing)}")
    print(f"{len(photos)} photos in {args.out}; dlib's HOG detector finds a face in every one")


if __name__ == "__main__":
    main()
