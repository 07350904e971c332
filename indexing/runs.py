"""Committed ingest runs as the index build sees them: manifests, faces shards, occurrences.

Only runs with a committed ``_manifest.json`` are read, and every shard (faces and images) is
checked against the sha256 that manifest lists before pyarrow reads it. Shards are read in record
batches so that a build never needs a whole table in memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.core.errors import ConfigError, FatalError
from pipelines.core.names import check_name
from pipelines.core.schema import ADDED_IMAGE_FIELDS, IMAGES_SCHEMA
from pipelines.core.writer import RUN_FORMAT, is_committed
from pipelines.core.writer import RUN_MANIFEST as MANIFEST

BATCH_ROWS = 65_536
META_COLUMNS = ["face_id", "image_sha256", "dataset", "source_uri", "face_index", "bbox", "det_score"]


@dataclass(frozen=True, slots=True)
class Shard:
    uri: str
    sha256: str
    rows: int


@dataclass(slots=True)
class Run:
    """One committed run: its folder, parsed manifest and the manifest's own digest."""

    uri: str
    manifest: dict
    manifest_sha256: str
    faces: list[Shard] = field(default_factory=list)
    images: list[Shard] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return str(self.manifest["run_id"])


def find_runs(uris: list[str]) -> list[Run]:
    """Every committed run named by ``uris``: run folders, or ``<out>`` roots holding ``runs/``."""
    folders: list[str] = []
    for uri in uris:
        folders.extend(_run_folders(uri))
    runs = [load_run(f) for f in dict.fromkeys(folders)]
    if not runs:
        raise ConfigError(f"no committed run (a folder with {MANIFEST}) under {', '.join(uris)}")
    return sorted(runs, key=lambda r: (r.run_id, r.uri))


def _run_folders(uri: str) -> list[str]:
    uri = uri.rstrip("/")
    if is_committed(uri):
        return [uri]
    parent = storage.join(uri, "runs") if storage.exists(storage.join(uri, "runs")) else uri
    return [
        storage.join(parent, name)
        for name in storage.listdir(parent)
        if is_committed(storage.join(parent, name))
    ]


def load_run(folder: str) -> Run:
    raw = storage.read_bytes(storage.join(folder, MANIFEST))
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise FatalError(f"{storage.join(folder, MANIFEST)} is not valid JSON: {exc}") from exc
    if manifest.get("format") != RUN_FORMAT:
        raise FatalError(f"{folder}: run format {manifest.get('format')!r}, expected {RUN_FORMAT!r}")
    check_name(manifest.get("run_id"), "run id in a run manifest")  # read back: steers no path either
    run = Run(folder, manifest, hashlib.sha256(raw).hexdigest())
    for entry in manifest.get("shards", []):
        shard = Shard(storage.join(folder, entry["file"]), entry["sha256"], int(entry["rows"]))
        (run.faces if entry["table"] == "faces" else run.images).append(shard)
    run.faces.sort(key=lambda s: s.uri)
    run.images.sort(key=lambda s: s.uri)
    return run


def check_same_model(runs: list[Run]) -> tuple[str, int]:
    """The one (model_id, dim) of all runs; vectors of different models never share an index."""
    pairs = {(r.manifest["model_id"], int(r.manifest["dim"])) for r in runs}
    if len(pairs) != 1:
        listing = "; ".join(f"{r.run_id}: {r.manifest['model_id']} dim {r.manifest['dim']}" for r in runs)
        raise ConfigError(f"the runs mix models or dims and cannot share one index ({listing})")
    return next(iter(pairs))


def verify_shard(shard: Shard) -> None:
    actual = storage.sha256_file(shard.uri)
    if actual != shard.sha256:
        raise FatalError(f"{shard.uri}: sha256 {actual} does not match its run manifest ({shard.sha256})")


def iter_batches(shard: Shard, columns: list[str], batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The shard's ``columns`` in batches. An ``images`` column added after the first runs were
    written (``ADDED_IMAGE_FIELDS``) reads as nulls from an older shard that lacks it; any other
    missing column is an error."""
    fs, path = storage.url_to_fs(shard.uri)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        present = set(parquet.schema_arrow.names)
        absent = [c for c in columns if c not in present and c in ADDED_IMAGE_FIELDS]
        if not absent:
            yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)
            return
        read = [c for c in columns if c not in absent]
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=read):
            yield pa.RecordBatch.from_arrays(
                [
                    pa.nulls(batch.num_rows, IMAGES_SCHEMA.field(c).type) if c in absent else batch.column(c)
                    for c in columns
                ],
                names=columns,
            )


def embeddings(batch: pa.RecordBatch, dim: int) -> np.ndarray:
    """The ``embedding`` column as a C-contiguous float32 [rows, dim] array."""
    col = batch.column(batch.schema.get_field_index("embedding"))
    values = col.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(-1, dim), dtype=np.float32)


def check_batch_model(batch: pa.RecordBatch, model_id: str, shard: Shard) -> None:
    """A faces row whose model_id differs from its run's is a corrupt input, not a skip."""
    col = batch.column(batch.schema.get_field_index("model_id"))
    others = pc.unique(pc.filter(col, pc.not_equal(col, model_id)))
    if len(others):
        raise ConfigError(f"{shard.uri} holds faces of model {others[0].as_py()!r}, expected {model_id!r}")


def image_batches(runs: list[Run], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Record batches of every run's ``images`` shards, each shard checked against its sha256 first."""
    for run in runs:
        for shard in run.images:
            verify_shard(shard)
            yield from iter_batches(shard, columns)


def sha_keys(shas: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
    """64 bits of each hex sha256 (its first 16 hex digits) as uint64, without a Python loop.

    A key names an image for routing only: two images that share a key cost an extra row, which an
    exact match on the full sha256 then drops.
    """
    arr = shas.combine_chunks() if isinstance(shas, pa.ChunkedArray) else shas
    if arr.null_count or len(arr) == 0:
        if arr.null_count:
            raise FatalError(f"{where}: image_sha256 has nulls where every row needs one")
        return np.zeros(0, np.uint64)
    binary = arr.cast(pa.binary())
    offsets = np.frombuffer(binary.buffers()[1], np.int32)[binary.offset : binary.offset + len(binary) + 1]
    if not (np.diff(offsets) == 64).all():
        raise FatalError(f"{where}: an image_sha256 is not 64 hex digits")
    data = np.frombuffer(binary.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(-1, 64)
    digits = _HEX[data[:, :16]].astype(np.uint64)
    if (digits > 15).any():
        raise FatalError(f"{where}: an image_sha256 is not 64 hex digits")
    keys = np.zeros(len(data), np.uint64)
    for i in range(16):
        keys = (keys << np.uint64(4)) | digits[:, i]
    return keys


_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def dataset_versions(runs: list[Run]) -> list[dict]:
    """Distinct (name, version) of the data sets the runs ingested, sorted."""
    seen = {(d["name"], str(d.get("version", ""))) for r in runs for d in r.manifest.get("datasets", [])}
    return [{"name": n, "version": v} for n, v in sorted(seen)]


def image_counts(runs: list[Run]) -> dict[str, int]:
    """Occurrence rows per data set (every status), from the counts each run manifest records."""
    counts: dict[str, int] = {}
    for run in runs:
        for name, c in run.manifest.get("counts", {}).get("per_dataset", {}).items():
            counts[name] = counts.get(name, 0) + int(c.get("images", 0))
    return dict(sorted(counts.items()))
