"""A whole run with everything in gs:// (fake-gcs-server): ingest, index, open_index, search.

The same job runs on local disk first; the gs:// run, and a gs:// run through injected faults, must
give the same rows and the same search results. Source URIs differ by their folder only, so rows
are compared by the last part of each source URI.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from indexing import build_index, open_index
from pipelines.core import gcs, storage
from pipelines.core.config import JobConfig
from pipelines.engines.local_engine import run_job
from tests.gcs_emulator import Fault
from tests.helpers import make_job

BUCKET = "faceaudit-it"


@pytest.fixture(scope="module")
def sources(tmp_path_factory, faces_dir) -> Path:
    """12 shared photos at 480 px: 6 loose in a folder, 3 in a tar shard, 3 named by a URI list."""
    root = tmp_path_factory.mktemp("sources")
    photos = []
    for photo in sorted(faces_dir.glob("img*.jpg"))[:12]:
        image = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
        image.thumbnail((480, 480))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        photos.append((photo.name, buffer.getvalue()))
    for name, data in photos[:6]:
        _put(root / "folder" / name, data)
    (root / "tars").mkdir()
    with tarfile.open(root / "tars" / "shard-0.tar", "w") as tar:
        for name, data in photos[6:9]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for name, data in photos[9:]:
        _put(root / "listed" / name, data)
    (root / "list.txt").write_text("# three photos\n" + "".join(f"listed/{n}\n" for n, _ in photos[9:]))
    return root


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def job(root: str, out: str) -> JobConfig:
    datasets = [
        ("folder", storage.join(root, "folder")),
        ("tars", storage.join(root, "tars/*.tar")),
        ("list", storage.join(root, "list.txt")),
    ]
    return make_job(out, *datasets, run_id="r1", images_per_shard=4, workers=2)


def rows(run: str, table: str) -> list[dict]:
    """Every row of a run's table (local or gs://), without run_id, source URIs cut to their last part."""
    parts = [u for u in storage.walk_files(storage.join(run, table)) if u.endswith(".parquet")]
    tables = [pq.read_table(pa.BufferReader(storage.read_bytes(u))) for u in parts]
    out = pa.concat_tables(tables).drop(["run_id"]).to_pylist()
    for row in out:
        row["source_uri"] = row["source_uri"].rsplit("/", 1)[-1]
    return sorted(out, key=lambda r: (r["dataset"], r["source_uri"], r.get("face_index", 0)))


def hits(index, vectors: np.ndarray) -> list[list[tuple]]:
    return [
        [
            (
                h.face_id,
                round(h.score, 5),
                h.image_sha256,
                h.bbox,
                sorted(o.source_uri.rsplit("/", 1)[-1] for o in h.occurrences),
            )
            for h in found
        ]
        for found in index.search(vectors, k=5)
    ]


@pytest.fixture(scope="module")
def bucket(gcs_emulator, sources) -> str:
    """The sources, uploaded to the emulator."""
    root = gcs_emulator.make_bucket(BUCKET)
    for path in sorted(p for p in sources.rglob("*") if p.is_file()):
        uri = storage.join(root, "src", path.relative_to(sources).as_posix())
        storage.write_atomic(uri, path.read_bytes(), create_only=True)
    return root


@pytest.fixture(scope="module")
def local(sources, tmp_path_factory):
    """The reference: the same job and index on local disk."""
    out = tmp_path_factory.mktemp("local")
    summary = run_job(job(str(sources), str(out / "runs-out")))
    build_index([str(out / "runs-out")], str(out / "index"))
    index = open_index(str(out / "index"))
    queries = np.asarray([r["embedding"] for r in rows(summary.uri, "faces")], dtype=np.float32)
    return summary, index, queries


@pytest.fixture(scope="module")
def gcs_run(bucket):
    """The same job and index with everything in the emulator."""
    run = run_job(job(storage.join(bucket, "src"), storage.join(bucket, "out")))
    build_index([storage.join(bucket, "out")], storage.join(bucket, "index"))
    return run


def test_a_run_and_index_in_gcs_equal_the_same_on_disk(bucket, gcs_run, local, tmp_path):
    summary, local_index, queries = local
    assert gcs_run.uri.startswith("gs://") and gcs_run.manifest["counts"] == summary.manifest["counts"]
    assert gcs_run.manifest["counts"]["faces"] > 0 and set(gcs_run.manifest["counts"]["per_dataset"]) == {
        "folder",
        "tars",
        "list",
    }
    for table in ("images", "faces"):
        assert rows(gcs_run.uri, table) == rows(summary.uri, table)
    index = open_index(storage.join(bucket, "index"), cache_dir=str(tmp_path / "cache"))
    assert index.manifest["factory"] == local_index.manifest["factory"]
    assert hits(index, queries) == hits(local_index, queries)
    assert not [u for u in storage.walk_files(bucket) if storage.TMP_MARK in u]


def test_open_index_through_flipped_and_dropped_downloads(bucket, gcs_run, local, tmp_path, fault_proxy):
    _, local_index, queries = local
    fault_proxy.plan(
        Fault("flip", "GET", "*CURRENT?alt=media*"),
        Fault("flip", "GET", "*manifest.json?alt=media*"),
        Fault("flip", "GET", "*shard-0.faissindex?alt=media*"),
        Fault("drop", "GET", "*metadata%2Fpart-0.parquet?alt=media*"),
    )
    index = open_index(storage.join(bucket, "index"), cache_dir=str(tmp_path / "cache"))
    assert len(fault_proxy.injected) == 4, fault_proxy.injected
    assert hits(index, queries) == hits(local_index, queries)


def test_a_run_through_faults_gives_the_same_rows(bucket, local, fault_proxy, monkeypatch):
    monkeypatch.setattr(gcs, "BACKOFF_S", 0.01)
    summary, _, _ = local
    fault_proxy.plan(
        Fault("drop", "POST", "*faces/part-*", times=2),  # committed, but the reply is lost
        Fault("503", "POST", "*images/part-*", times=2),
        Fault("drop", "POST", "*_manifest.json*"),
        Fault("flip", "GET", "*src%2Ffolder%2F*alt=media*", times=2),  # images read whole
        Fault("drop", "GET", "*src%2Ffolder%2F*alt=media*"),
        Fault("flip", "GET", "*shard-0.tar?alt=media*"),
        Fault("flip", "GET", "*list.txt?alt=media*"),
        Fault("flip", "GET", "*images%2Fpart-*alt=media*", times=2),  # shards read back for the manifest
        Fault("503", "GET", "*faces%2Fpart-*alt=media*"),
    )
    run = run_job(job(storage.join(bucket, "src"), storage.join(bucket, "faulty")))
    assert {kind for kind, _, _ in fault_proxy.injected} == {"503", "drop", "flip"}
    assert len(fault_proxy.injected) == 13, fault_proxy.injected
    for table in ("images", "faces"):
        assert rows(run.uri, table) == rows(summary.uri, table)
    assert run.manifest["counts"] == summary.manifest["counts"]
