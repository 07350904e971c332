"""Synthetic ingest runs and vectors with known structure, for tests and benchmarks.

``write_run`` writes a run folder exactly as the ingest engine does (faces and images shards,
``_manifest.json`` last); ``clustered`` makes unit vectors around random centres, which is what
face embeddings look like to an index (people are clusters) and what makes IVF recall non-trivial.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.core.records import face_id
from pipelines.core.schema import ADDED_IMAGE_FIELDS, IMAGES_SCHEMA, faces_schema

MODEL_ID = "synthetic+unit-v1"


def clustered(
    n: int, dim: int, clusters: int = 1000, spread: float = 1.5, seed: int = 0, chunk: int = 100_000
) -> Iterator[np.ndarray]:
    """Unit vectors in chunks: a random centre per cluster plus Gaussian noise of ``spread`` norm."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        noise = rng.standard_normal((m, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        x = centres[rng.integers(0, clusters, m)] + noise
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def image_sha(key: int) -> str:
    return hashlib.sha256(f"synthetic-image-{key}".encode()).hexdigest()


def write_run(
    out: str,
    run_id: str,
    vectors: Iterator[np.ndarray] | np.ndarray,
    dim: int,
    start: int = 0,
    dataset: str = "synthetic",
    model_id: str = MODEL_ID,
    match_threshold: float = 0.5,
    extra_occurrences: dict[int, list[tuple[str, str]]] | None = None,
) -> str:
    """A committed run under ``<out>/runs/<run_id>``: one face per image, image keys from ``start``.

    Each chunk of ``vectors`` becomes one faces and one images shard. ``extra_occurrences`` maps
    an image key to further (dataset, source_uri) where the same bytes were found.
    """
    folder = storage.join(out, "runs", run_id)
    chunks = [vectors] if isinstance(vectors, np.ndarray) else vectors
    shards, key, counts = [], start, {"images": 0, "ok": 0, "no_face": 0, "error": 0, "faces": 0}
    datasets = {dataset}
    for part, chunk in enumerate(chunks):
        keys = list(range(key, key + len(chunk)))
        key += len(chunk)
        extra = {k: (extra_occurrences or {}).get(k, []) for k in keys}
        datasets.update(d for occ in extra.values() for d, _ in occ)
        faces = faces_table(chunk, keys, dataset, model_id, run_id, dim)
        images = images_table(keys, dataset, run_id, extra)
        for table, name in ((faces, "faces"), (images, "images")):
            rel = f"{name}/part-{dataset}-{part:06d}.parquet"
            data = parquet_bytes(table)
            storage.write_atomic(storage.join(folder, rel), data)
            shards.append(
                {
                    "table": name,
                    "file": rel,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "rows": table.num_rows,
                }
            )
        counts["images"] += images.num_rows
        counts["ok"] += images.num_rows
        counts["faces"] += faces.num_rows
    manifest = {
        "format": "faceaudit.run/1",
        "run_id": run_id,
        "engine": "synthetic",
        "model_id": model_id,
        "dim": dim,
        "match_threshold": match_threshold,
        "model": {"backend": "synthetic"},
        "datasets": [
            {"name": d, "version": "1", "source": f"synthetic://{d}", "license": "none"}
            for d in sorted(datasets)
        ],
        "counts": counts,
        "shards": shards,
        "created_at": now(),
        "finished_at": now(),
    }
    storage.write_atomic(storage.join(folder, "_manifest.json"), json.dumps(manifest, indent=2).encode())
    return folder


def faces_table(
    vectors: np.ndarray, keys: list[int], dataset: str, model_id: str, run_id: str, dim: int
) -> pa.Table:
    n = len(keys)
    shas = [image_sha(k) for k in keys]
    boxes = np.tile(np.array([10, 20, 110, 140], np.float32), (n, 1))
    columns = {
        "face_id": pa.array([face_id(s, model_id, 0) for s in shas], pa.int64()),
        "image_sha256": pa.array(shas, pa.string()),
        "dataset": pa.array([dataset] * n, pa.string()),
        "source_uri": pa.array([f"synthetic://{dataset}/{k}.jpg" for k in keys], pa.string()),
        "face_index": pa.array(np.zeros(n, np.int16)),
        "bbox": fixed_list(boxes, 4),
        "det_score": pa.array(np.full(n, 0.99, np.float32)),
        "landmarks": fixed_list(np.zeros((n, 10), np.float32), 10),
        "embedding": fixed_list(np.asarray(vectors, np.float32), dim),
        "model_id": pa.array([model_id] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
    }
    return pa.table(columns, schema=faces_schema(dim))


def images_table(
    keys: list[int], dataset: str, run_id: str, extra: dict[int, list[tuple[str, str]]]
) -> pa.Table:
    rows = [(image_sha(k), dataset, f"synthetic://{dataset}/{k}.jpg") for k in keys]
    rows += [(image_sha(k), d, uri) for k in keys for d, uri in extra[k]]
    n = len(rows)
    return pa.table(
        {
            "image_sha256": [r[0] for r in rows],
            "dataset": [r[1] for r in rows],
            "source_uri": [r[2] for r in rows],
            "status": ["ok"] * n,
            "error_stage": [None] * n,
            "error": [None] * n,
            "width": [640] * n,
            "height": [480] * n,
            "n_faces": [1] * n,
            "run_id": [run_id] * n,
            **{name: [None] * n for name in ADDED_IMAGE_FIELDS},
        },
        schema=IMAGES_SCHEMA,
    )


def fixed_list(values: np.ndarray, size: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), size)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
