"""Turn rows into Parquet shards (zstd) and commit them atomically; write the run manifest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import erasure, storage
from .names import check_name
from .schema import IMAGES_SCHEMA, faces_schema

RUN_FORMAT = "faceaudit.run/1"
RUN_MANIFEST = "_manifest.json"  # written last: a run without it is never read
RUN_PLAN = "_plan.json"  # the run's data sets and units, written once at its first start (run.py)
RUN_LOCK = "_run.lock"  # held by the one process writing the run (run.py), removed when it ends


def is_committed(run: str) -> bool:
    return storage.exists(storage.join(run, RUN_MANIFEST))


def read_manifest(run: str) -> dict:
    """A committed run's manifest; its run id is checked like one given on the command line."""
    body = json.loads(storage.read_text(storage.join(run, RUN_MANIFEST)))
    check_name(body.get("run_id"), "run id")
    return body


@dataclass(frozen=True, slots=True)
class ShardInfo:
    table: str  # "faces" | "images"
    file: str  # relative to the run folder
    sha256: str
    rows: int


def _fixed_list(rows: list[dict], key: str, width: int) -> pa.FixedSizeListArray:
    flat = np.asarray([row[key] for row in rows], dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), width)


def faces_table(rows: list[dict], dim: int) -> pa.Table:
    schema = faces_schema(dim)
    columns = {}
    for field in schema:
        if pa.types.is_fixed_size_list(field.type):
            columns[field.name] = _fixed_list(rows, field.name, field.type.list_size)
        else:
            columns[field.name] = pa.array([row[field.name] for row in rows], type=field.type)
    return pa.Table.from_pydict(columns, schema=schema)


def images_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def commit_table(run_uri: str, table_name: str, part: str, table: pa.Table) -> ShardInfo:
    """Write ``<run>/<table>/part-<part>.parquet`` whole, atomically; erased faces never reach it."""
    if table_name == "faces":
        table = erasure.drop_erased(run_uri, table)  # docs/erasure.md: the run's erasure log
    data = parquet_bytes(table)
    rel = f"{table_name}/part-{part}.parquet"
    storage.write_atomic(storage.join(run_uri, rel), data)
    return ShardInfo(table_name, rel, hashlib.sha256(data).hexdigest(), table.num_rows)


def shard_info(run_uri: str, rel: str) -> ShardInfo:
    """Describe a shard that a previous attempt committed."""
    uri = storage.join(run_uri, rel)
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    return ShardInfo(rel.split("/", 1)[0], rel, storage.sha256_file(uri), rows)


def write_manifest(run_uri: str, manifest: dict, shards: list[ShardInfo]) -> None:
    """The run's commit point: written last, create-only."""
    body = dict(manifest, shards=[asdict(s) for s in shards])
    data = json.dumps(body, indent=2, sort_keys=True).encode()
    storage.write_atomic(storage.join(run_uri, RUN_MANIFEST), data, create_only=True)
