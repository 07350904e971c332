"""Small helpers shared by tests: read a run back, sort rows for comparison."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def read_table(run: str | Path, table: str) -> pa.Table:
    parts = sorted((Path(run) / table).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None


def manifest(run: str | Path) -> dict:
    return json.loads((Path(run) / "_manifest.json").read_text())


def image_rows(run) -> list[dict]:
    rows = read_table(run, "images").drop(["run_id"]).to_pylist()
    return sorted(rows, key=lambda r: (r["dataset"], r["source_uri"]))


def face_rows(run) -> list[dict]:
    rows = read_table(run, "faces").drop(["run_id"]).to_pylist()
    return sorted(rows, key=lambda r: r["face_id"])


def largest_face_embeddings(run) -> dict[str, np.ndarray]:
    """File name -> embedding of its largest face, from the Parquet output."""
    faces = read_table(run, "faces").to_pylist()
    best: dict[str, tuple[float, np.ndarray]] = {}
    for row in faces:
        x1, y1, x2, y2 = row["bbox"]
        area = (x2 - x1) * (y2 - y1)
        name = Path(row["source_uri"]).name
        if name not in best or area > best[name][0]:
            best[name] = (area, np.asarray(row["embedding"], dtype=np.float32))
    return {name: emb for name, (_, emb) in best.items()}


def write_small_copies(photos, folder: Path, max_side: int, quality: int = 90) -> None:
    """Upright JPEG copies of ``photos`` in ``folder``, no longer than ``max_side``: fast runs."""
    import io

    from PIL import Image, ImageOps

    for photo in photos:
        image = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
        image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        (Path(folder) / Path(photo).name).write_bytes(buffer.getvalue())


@contextlib.contextmanager
def kill_once(point: str, marker: Path) -> Iterator[None]:
    """For the code inside: the first process to reach kill point ``point`` (pipelines.core.faults)
    dies by SIGKILL and leaves ``marker``; the engines hand the variables to their workers."""
    from pipelines.core.faults import KILL_AT, KILL_ONCE

    # Only these two: mock.patch.dict would restore all of os.environ, dropping what code inside
    # set for good (ray.init puts its cluster's auth token there for later drivers to find).
    saved = {key: os.environ.get(key) for key in (KILL_AT, KILL_ONCE)}
    os.environ.update({KILL_AT: point, KILL_ONCE: str(marker)})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
