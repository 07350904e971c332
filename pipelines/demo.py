"""``make demo``: ingest two small data sets made from the sample photos that ship in the
insightface wheel, build an index, search it with an altered photo, and print what happened.

It writes the same reports as the command line: the ingest run's ``report.json`` and
self-contained ``report.html`` beside its manifest (as ``faceaudit ingest``), and the index
version's under ``<index>/reports/<version>/`` (as ``faceaudit index build --report``); the paths
of the two ``report.html`` are its last two lines.

The two data sets: ``originals`` (the photos as shipped, plus one broken file and one exact
copy, to show error rows and de-duplication) and ``variants`` (re-encoded, cropped and mirrored
copies, which are new bytes and so new images, but the same people).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import shutil
from pathlib import Path

from PIL import Image, ImageOps

from .core.config import DatasetSpec, JobConfig
from .core.errors import FatalError


def sample_photos() -> list[Path]:
    """The sample images of the insightface wheel, found without importing insightface."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise FatalError("the demo photos come with insightface: pip install --no-deps insightface")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "images"
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    if not photos:
        raise FatalError(f"no sample photos in {folder}")
    return photos


def make_datasets(work: Path) -> dict[str, Path]:
    originals, variants = work / "data" / "originals", work / "data" / "variants"
    for folder in (originals, variants):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    # The samples' own file names may name a person; faceaudit never records who a face is, so
    # the demo's data sets number them instead (photo-1 ... in the samples' sorted order).
    for number, photo in enumerate(sample_photos(), start=1):
        stem = f"photo-{number}"
        shutil.copy(photo, originals / f"{stem}{photo.suffix.lower()}")
        image = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
        _save(image, variants / f"{stem}-q60.jpg", quality=60)
        w, h = image.size
        _save(image.crop((w // 20, h // 20, w - w // 20, h - h // 20)), variants / f"{stem}-crop.jpg")
        _save(ImageOps.mirror(image), variants / f"{stem}-mirror.jpg")
    first = sorted(originals.iterdir())[0]
    shutil.copy(first, originals / f"copy-of-{first.name}")  # same bytes: one image, two occurrences
    (originals / "broken.jpg").write_bytes(first.read_bytes()[:2000])  # a truncated file: an error row
    return {"originals": originals, "variants": variants}


def _save(image: Image.Image, path: Path, quality: int = 90) -> None:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    path.write_bytes(buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="demo", help="folder for the demo's data, runs and index")
    args = parser.parse_args(argv)
    work = Path(args.work)
    datasets = make_datasets(work)
    job = JobConfig(
        datasets=[DatasetSpec(name=name, source=str(path)) for name, path in datasets.items()],
        out=str(work),
        images_per_shard=8,
    )
    from .cli import print_run_summary
    from .engines.local_engine import run_job
    from .rebuild.report import run_report, write_report

    summary = run_job(job)
    print_run_summary(summary.manifest, summary.uri, summary.seconds, summary.resumed_units)
    run_html = write_report(summary.uri, run_report(summary.uri, summary.analyzed))[1]
    index_html = _index_and_search(summary.uri, work, datasets["variants"])
    print("\nreports (open in a browser): the ingest run's, then the index version's")
    print(Path(run_html).resolve())
    print(Path(index_html).resolve())


def _index_and_search(run: str, work: Path, variants: Path) -> str:
    """Build an index of the run, write its report, and look for the people of two altered photos
    in it; returns the index report's ``report.html``."""
    from indexing import build_index, open_index

    from .commands.index import info_lines, print_report, search_report
    from .rebuild.report import write_index_report

    index_root = str(work / "index")
    result = build_index([run], index_root)
    index_html = write_index_report(index_root, result.manifest)[1]
    print("\nindex " + result.folder)
    for line in info_lines(result.manifest):
        print("  " + line)
    queries = [variants / "photo-6-mirror.jpg", variants / "photo-1-crop.jpg"]  # a group photo; a portrait
    print(f"\nsearch: {', '.join(q.name for q in queries)}")
    print_report(search_report(open_index(index_root), queries, k=10, threshold=None, nprobe=None))
    _look_up_copies(index_root, work, variants / "photo-1-q60.jpg")
    return index_html


def _look_up_copies(index_root: str, work: Path, source: Path) -> None:
    """``faceaudit lookup --photo`` with a copy of a photo that no data set holds (half size,
    re-encoded): the index finds the photo's copies by their PDQ hash, not by their bytes."""
    from indexing import open_index

    from .commands.lookup import answer, print_rows

    query = work / "query" / "photo-1-half.jpg"
    query.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(source)
    _save(image.resize((image.width // 2, image.height // 2)), query, quality=75)
    print(f"\nlookup --photo {query.name} (a re-encoded copy at half size, in no data set)")
    index = open_index(index_root)
    try:
        print_rows(answer(index, [], [(query.name, query.read_bytes())]))
    finally:
        index.close()


if __name__ == "__main__":
    main()
