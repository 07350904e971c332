"""Hugging Face hub Parquet files: an image column holding a struct with ``bytes`` and/or ``path``
(the ``datasets`` Image feature), or plain binary, plus label columns.

Only the image column and an id-like column are ever read (``iter_batches(columns=...)``): label
columns (``name``, ``label``, ``celebrity``, identity ids) name people and never leave the file.
Units are row groups, sliced into runs of at most ``every`` rows; batches are small, so memory
holds a few images at a time however big the file is.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .. import roots, storage
from ..errors import ConfigError
from ..roots import is_http
from .common import Record, provenance, row_uri

SUFFIXES = (".parquet",)
ID_COLUMNS = ("id", "image_id", "record_id", "__key__", "key")  # never "label" or "celebrity_id"
BATCH_ROWS = 16
# pyarrow decodes a row group's image column whole (about twice its size in memory, measured with
# pyarrow 25), whatever the batch size: a group larger than this is refused, one error row per
# row. The `datasets` library writes image files in groups of 100 rows.
MAX_GROUP_BYTES = 1 << 30


def _open(uri: str) -> pq.ParquetFile:
    fs, path = storage.url_to_fs(uri)
    return pq.ParquetFile(fs.open(path, "rb"))


def image_type_ok(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if not pa.types.is_struct(kind):
        return False
    names = {kind.field(i).name for i in range(kind.num_fields)}
    return bool(names & {"bytes", "path"})


def looks_like(uri: str, image_column: str) -> bool:
    try:
        schema = _open(uri).schema_arrow
    except (OSError, pa.ArrowException):
        return False
    return image_column in schema.names and image_type_ok(schema.field(image_column).type)


def plan(uri: str, image_column: str, every: int) -> tuple[tuple[str, ...], list[tuple[int, ...]]]:
    """The columns to read (the image's, then an id's if any) and the units' spans
    (first_row, row_group, offset_in_group, rows); ConfigError when the file does not fit."""
    try:
        parquet = _open(uri)
        schema, meta = parquet.schema_arrow, parquet.metadata
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"{uri} is not hf-parquet: not a Parquet file ({exc})") from exc
    if image_column not in schema.names:
        raise ConfigError(f"{uri} is not hf-parquet: it has no column {image_column!r} (image_column)")
    if not image_type_ok(schema.field(image_column).type):
        raise ConfigError(
            f"{uri} is not hf-parquet: column {image_column!r} is {schema.field(image_column).type}, "
            "not a struct with bytes and/or path, nor binary"
        )
    id_column = next((c for c in ID_COLUMNS if c in schema.names and c != image_column), None)
    columns = (image_column,) + ((id_column,) if id_column else ())
    spans, first = [], 0
    for group in range(meta.num_row_groups):
        n = meta.row_group(group).num_rows
        spans += [(first + o, group, o, min(every, n - o)) for o in range(0, n, every)]
        first += n
    return columns, spans


def records(uri: str, span: tuple[int, ...], columns: tuple[str, ...], max_bytes: int) -> Iterator[Record]:
    first_row, group, offset, count = span
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    parquet = _open(uri)
    size = _column_bytes(parquet.metadata.row_group(group), columns[0])
    if size > MAX_GROUP_BYTES:
        reason = f"row group {group} holds {size >> 20} MiB of images, over {MAX_GROUP_BYTES >> 20} MiB"
        yield from (Record(row_uri(uri, first_row + i), error=reason) for i in range(count))
        return
    row = first_row - offset  # the group's first row
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=list(columns)):
        images = batch.column(0)
        ids = batch.column(1) if batch.num_columns > 1 else None
        for i in range(batch.num_rows):
            if first_row <= row < first_row + count:
                record_id = ids[i].as_py() if ids is not None else None
                yield _record(row_uri(uri, row), images[i].as_py(), record_id, base, max_bytes)
            row += 1
        if row >= first_row + count:
            return


def _column_bytes(group: pq.RowGroupMetaData, column: str) -> int:
    """The uncompressed bytes of ``column``'s leaves (``image.bytes``, ``image.path``) in a group."""
    leaves = (group.column(i) for i in range(group.num_columns))
    return sum(c.total_uncompressed_size for c in leaves if c.path_in_schema.split(".", 1)[0] == column)


def _record(where: str, image: object, record_id: object, base: str, max_bytes: int) -> Record:
    kept = provenance(record_id=record_id if isinstance(record_id, (str, int)) else None)
    data, path = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (image, None)
    if data is not None:
        if len(data) > max_bytes:
            return Record(where, error=f"larger than max_bytes ({max_bytes})", provenance=kept)
        if data:
            return Record(where, data=data, provenance=kept)
    if not path:
        return Record(where, error="the image has neither bytes nor a path", provenance=kept)
    if is_http(path):
        return Record(where, error="the image path is a URL, not a file of the data set", provenance=kept)
    return Record(where, fetch=roots.resolve_entry(path, base), provenance=kept)
