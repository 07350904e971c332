"""One bundle shard, on any engine: add its rows into a copy of the trained index and commit its
files (the FAISS index, sorted ids, metadata with occurrences, the float16 re-rank store).

``build_shard`` is pure in its inputs, so a retried task writes the same bytes to the same names.
The local engine runs the shards in order (``run_local``); ``build_ray`` and ``build_beam`` run
them as Ray tasks or Beam workers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.core.faults import checkpoint

from . import bundle, gpu
from . import runs as runsmod
from .faiss_io import write_faiss
from .inputs import Piece
from .occurrences import faces_per_dataset, occurrence_lists, read_occurrences
from .recall import ExactTopK
from .runs import META_COLUMNS

METADATA_ROW_GROUP = 4096
TOP_K = 11  # exact neighbours kept per held-out query: its own face plus 10


@dataclass(slots=True)
class ShardTask:
    """Everything bundle shard ``k`` needs besides the trained index and the queries; picklable."""

    k: int
    folder: str  # the version folder (local or gs://) the shard's files are committed to
    pieces: list[Piece]
    occurrences: str  # parquet of the occurrences of this shard's images (a superset)
    rerank: bool
    on_disk: bool
    dim: int
    use_gpu: bool


@dataclass(slots=True)
class ShardResult:
    """A written shard: its manifest entry and the exact top-k of the queries over its rows."""

    entry: dict
    scores: np.ndarray
    ids: np.ndarray


# Runs every task with the trained index (faiss.serialize_index bytes) and the queries; returns
# the results in task order. The local runner is below; build_ray and build_beam provide others.
ShardRunner = Callable[[list[ShardTask], bytes, np.ndarray], list[ShardResult]]


def run_local(tasks: list[ShardTask], trained: bytes, queries: np.ndarray) -> list[ShardResult]:
    """The local engine: every shard in this process, one after another."""
    return [build_shard(task, trained, queries) for task in tasks]


def build_shard(task: ShardTask, trained: bytes, queries: np.ndarray) -> ShardResult:
    """Add the shard's rows into a copy of the trained index; commit its faiss file, sorted ids,
    metadata and float16 store. Pure in its inputs: a retry writes the same bytes to the same names."""
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    truth = ExactTopK(queries, TOP_K)
    scratch = scratch_dir(task.folder, task.k)
    try:
        ids, meta = [], []
        raw = os.path.join(scratch, "vectors.f16")
        with open(raw, "wb") as f16:
            for batch in piece_batches(task.pieces, [*META_COLUMNS, "embedding"]):
                vectors = runsmod.embeddings(batch, task.dim)
                batch_ids = batch.column(0).to_numpy()
                with gpu.gpu_quantizer(index, task.use_gpu):
                    index.add_with_ids(vectors, batch_ids)
                truth.update(vectors, batch_ids)
                ids.append(batch_ids)
                meta.append(pa.Table.from_batches([batch.drop_columns(["embedding"])]))
                if task.rerank:
                    f16.write(vectors.astype(np.float16).tobytes())
        entry = write_shard_files(scratch, task, index, np.concatenate(ids), pa.concat_tables(meta), raw)
        commit_files(scratch, task.folder, entry)
        checkpoint("index.shard_written")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ShardResult(entry, truth.scores, truth.ids)


def piece_batches(pieces: list[Piece], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The pieces' rows, in order, as record batches."""
    for piece in pieces:
        start = 0
        for batch in runsmod.iter_batches(piece.shard, columns):
            lo, hi = np.searchsorted(piece.rows, [start, start + batch.num_rows])
            if hi > lo:
                yield batch.take(pa.array(piece.rows[lo:hi] - start))
            start += batch.num_rows
            if hi == len(piece.rows):
                break


def scratch_dir(folder: str, k: int) -> str:
    """Where a shard's files are written before their commit: beside the bundle when it is local
    (so the commit is a rename), else a local temporary folder (the commit is an upload)."""
    if storage.is_local(folder):
        path = storage.url_to_fs(folder)[1]
        storage.make_dirs(path)
        return tempfile.mkdtemp(prefix=f".shard-{k}{storage.TMP_MARK}", dir=path)
    return tempfile.mkdtemp(prefix=f"faceaudit-shard-{k}-")


def write_shard_files(
    scratch: str, task: ShardTask, index: faiss.Index, ids: np.ndarray, meta: pa.Table, raw_f16: str
) -> dict:
    """Shard k's files in ``scratch``: the FAISS index (in RAM or on-disk lists), sorted ids,
    metadata and the float16 store; returns the shard's manifest entry."""
    k = task.k
    storage.make_dirs(os.path.join(scratch, "metadata"))
    storage.make_dirs(os.path.join(scratch, "store"))
    order = np.argsort(ids, kind="stable")
    entry: dict = {"shard": k, "ntotal": int(len(ids))}
    entry.update(write_faiss(scratch, k, index, task.on_disk))
    name = f"store/ids-{k}.npy"
    np.save(os.path.join(scratch, name), ids[order])
    entry["ids"] = bundle.file_entry(scratch, name)
    found = read_occurrences(task.occurrences, meta.column("image_sha256"))
    entry["metadata"] = write_metadata(scratch, k, meta.take(pa.array(order)), found)
    if task.rerank:
        entry["vectors"] = write_f16_sorted(scratch, k, raw_f16, order, task.dim)
    return entry


def commit_files(scratch: str, folder: str, entry: dict) -> None:
    """Move each written file into the version folder whole: a rename locally, one upload on GCS."""
    for item in bundle.bundle_files({"shards": [entry]}):
        storage.move_in(os.path.join(scratch, item["file"]), storage.join(folder, item["file"]))


def write_metadata(staging: str, k: int, meta: pa.Table, found: pa.Table) -> dict:
    """face_id -> image, face, box, score and every occurrence of the image, sorted by face_id."""
    table = meta.drop_columns(["dataset", "source_uri"]).append_column(
        "occurrences", occurrence_lists(meta, found)
    )
    name = f"metadata/part-{k}.parquet"
    pq.write_table(table, os.path.join(staging, name), compression="zstd", row_group_size=METADATA_ROW_GROUP)
    entry = {**bundle.file_entry(staging, name), "rows": table.num_rows}
    return {**entry, "faces_per_dataset": faces_per_dataset(meta, found)}


def write_f16_sorted(staging: str, k: int, raw: str, order: np.ndarray, dim: int) -> dict:
    """Rewrite the add-order float16 rows in face_id order, chunk by chunk through memory maps."""
    src = np.memmap(raw, dtype=np.float16, mode="r", shape=(len(order), dim))
    name = f"store/vectors-{k}.npy"
    dst = np.lib.format.open_memmap(
        os.path.join(staging, name), mode="w+", dtype=np.float16, shape=(len(order), dim)
    )
    step = 65_536
    for lo in range(0, len(order), step):
        dst[lo : lo + step] = src[order[lo : lo + step]]
    dst.flush()
    del dst, src
    return bundle.file_entry(staging, name)
