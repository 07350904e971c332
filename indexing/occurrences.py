"""Occurrences: where each indexed image was found (data set, source_uri), routed to the bundle
shards that hold its faces, and attached to each face row of the shard's metadata."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import storage

from . import runs as runsmod
from .bundle import BUILD_DIR
from .inputs import Inputs
from .runs import Run

OCCURRENCE = pa.struct([("dataset", pa.string()), ("source_uri", pa.string())])
OCCURRENCE_COLUMNS = ["image_sha256", "dataset", "source_uri"]


def spill_occurrences(
    runs: list[Run], inputs: Inputs, bounds: list[tuple[int, int]], folder: str
) -> list[str]:
    """One pass over the images shards: each occurrence of an indexed image goes to the spill file of
    every bundle shard holding one of its faces. Returns the spills' URIs, one per shard.

    Images are matched on 64 bits of their sha256: a collision only adds a row that the shard's
    exact match on the full sha256 drops. Memory: 24 bytes per kept face, plus one batch.
    """
    keys = np.concatenate([k[m] for k, m in zip(inputs.keys, inputs.keep, strict=True)])
    shard_of = np.zeros(len(keys), dtype=np.int64)
    for k, (lo, hi) in enumerate(bounds):
        shard_of[lo:hi] = k
    order = np.lexsort((shard_of, keys))
    keys, shard_of = keys[order], shard_of[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = (keys[1:] != keys[:-1]) | (shard_of[1:] != shard_of[:-1])
    keys, shard_of = keys[first], shard_of[first]
    local_dir = tempfile.mkdtemp(prefix="faceaudit-occurrences-")
    try:
        paths = write_spills(runs, keys, shard_of, len(bounds), local_dir)
        return [publish_spill(path, folder) for path in paths]
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


def write_spills(
    runs: list[Run], keys: np.ndarray, shard_of: np.ndarray, n_shards: int, local_dir: str
) -> list[str]:
    schema = pa.schema([(c, pa.string()) for c in OCCURRENCE_COLUMNS])
    paths = [os.path.join(local_dir, f"occurrences-{k}.parquet") for k in range(n_shards)]
    writers = [pq.ParquetWriter(p, schema, compression="zstd") for p in paths]
    try:
        for batch in runsmod.image_batches(runs, OCCURRENCE_COLUMNS):
            batch = batch.filter(pc.is_valid(batch.column(0)))
            batch_keys = runsmod.sha_keys(batch.column(0), "an images shard")
            lo = np.searchsorted(keys, batch_keys, side="left")
            hi = np.searchsorted(keys, batch_keys, side="right")
            counts = hi - lo
            rows = np.repeat(np.arange(len(batch_keys)), counts)
            # the matching entries lo..hi-1 of each row, flattened: lo repeated, plus 0, 1, ... within a row
            within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
            targets = shard_of[np.repeat(lo, counts) + within]
            for k in np.unique(targets):
                rows_k = batch.take(pa.array(rows[targets == k]))
                writers[k].write_table(pa.Table.from_batches([rows_k], schema))
    finally:
        for w in writers:
            w.close()
    return paths


def publish_spill(path: str, folder: str) -> str:
    uri = storage.join(folder, BUILD_DIR, os.path.basename(path))
    storage.move_in(path, uri)
    return uri


def read_occurrences(uri: str, shas: pa.ChunkedArray) -> pa.Table:
    """Distinct (image_sha256, dataset, source_uri) of the shard's images, sorted, from its spill."""
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    table = table.filter(pc.is_in(table.column(0), value_set=pc.unique(shas)))
    found = table.group_by(OCCURRENCE_COLUMNS, use_threads=False).aggregate([])
    return found.sort_by([(c, "ascending") for c in OCCURRENCE_COLUMNS])


def occurrence_lists(meta: pa.Table, found: pa.Table) -> pa.Array:
    """Per face row, the sorted occurrences of its image (its own row's when the images tables lack it)."""
    structs = pa.StructArray.from_arrays(
        [found.column("dataset").combine_chunks(), found.column("source_uri").combine_chunks()],
        fields=list(OCCURRENCE),
    )
    # ``found`` is sorted by sha: each run of equal shas is one image's list
    sha = found.column("image_sha256").combine_chunks()
    change = pc.not_equal(sha[1:], sha[:-1]).to_numpy(zero_copy_only=False) if len(sha) > 1 else []
    starts = np.concatenate([[0], np.flatnonzero(change) + 1]) if len(sha) else np.zeros(0, np.int64)
    offsets = pa.array(np.append(starts, len(sha)).astype(np.int32))
    grouped = pa.ListArray.from_arrays(offsets, structs)
    where = pc.index_in(meta.column("image_sha256"), value_set=sha.take(pa.array(starts)))
    if len(sha) and where.null_count == 0:
        return grouped.take(where)
    lists = grouped.take(pc.fill_null(where, 0)).to_pylist() if len(sha) else [None] * meta.num_rows
    missing = pc.is_null(where).to_pylist() if len(sha) else [True] * meta.num_rows
    own = zip(meta.column("dataset").to_pylist(), meta.column("source_uri").to_pylist(), strict=True)
    lists = [
        [{"dataset": d, "source_uri": u}] if gone else occ
        for occ, gone, (d, u) in zip(lists, missing, own, strict=True)
    ]
    return pa.array(lists, pa.list_(OCCURRENCE))


def faces_per_dataset(meta: pa.Table, found: pa.Table) -> dict[str, int]:
    """Faces whose image occurs at least once in each data set."""
    pairs = found.group_by(["image_sha256", "dataset"], use_threads=False).aggregate([])
    per_sha = meta.group_by("image_sha256", use_threads=False).aggregate([("face_id", "count")])
    where = pc.index_in(pairs.column("image_sha256"), value_set=per_sha.column("image_sha256"))
    counts = per_sha.column("face_id_count").combine_chunks().take(where)
    totals = (
        pa.table({"dataset": pairs.column("dataset"), "n": counts})
        .group_by("dataset")
        .aggregate([("n", "sum")])
    )
    return dict(
        sorted(zip(totals.column("dataset").to_pylist(), totals.column("n_sum").to_pylist(), strict=True))
    )
