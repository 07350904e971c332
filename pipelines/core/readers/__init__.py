"""Readers of the data set formats that are files of records rather than image files:
``msceleb-tsv``, ``hf-parquet`` and ``flickr-meta``.

Each plans a file into deterministic spans of rows (``WorkUnit.span``) and reads one span as
``Record``s: an image's bytes, a URI to read them from (``pipelines.core.sources`` reads it, with
the data set's roots and HTTP limits), or a short reason. A reader keeps only provenance
(``schema.PROVENANCE_FIELDS``); identity labels are read, where the format puts them on the same
line, only to be dropped.

``detect`` names the format of one file for ``format: auto``, from its extension and first bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from ..errors import ConfigError, FatalError
from ..records import WorkUnit
from . import flickr, hf_parquet, lines, msceleb
from .common import Record, row_uri

FORMATS = ("msceleb-tsv", "hf-parquet", "flickr-meta")
SUFFIXES = {
    "msceleb-tsv": msceleb.SUFFIXES,
    "hf-parquet": hf_parquet.SUFFIXES,
    "flickr-meta": (".csv", *flickr.JSONL_SUFFIXES),
}
PARQUET_MAGIC = b"PAR1"

__all__ = ["FORMATS", "SUFFIXES", "Record", "detect", "plan_file", "records"]


def detect(uri: str, image_column: str) -> str | None:
    """The record format of the file ``uri`` under ``format: auto``, or None when it is none of
    them (then it is a tar or a URI list, as before). A .csv or .parquet stays a URI list unless
    its columns say otherwise (Flickr columns; an image struct)."""
    lower = uri.lower()
    if lower.endswith(msceleb.SUFFIXES):
        return "msceleb-tsv"
    if lower.endswith(flickr.JSONL_SUFFIXES):
        return "flickr-meta"
    if lower.endswith(".csv"):
        return "flickr-meta" if flickr.looks_like_flickr(uri) else None
    if lower.endswith(".parquet"):
        return "hf-parquet" if hf_parquet.looks_like(uri, image_column) else None
    if lower.endswith((".txt", ".tar", ".tar.gz", ".tgz")):
        return None
    return _sniff(uri, image_column)


def _sniff(uri: str, image_column: str) -> str | None:
    """A file named by none of the known endings, by its first bytes."""
    try:
        head = lines.first_line(uri, 1 << 20)
    except OSError:
        return None
    if head.startswith(PARQUET_MAGIC):
        return "hf-parquet" if hf_parquet.looks_like(uri, image_column) else None
    if head.count(b"\t") == msceleb.COLUMNS - 1:
        return "msceleb-tsv"
    if head.lstrip().startswith(b"{"):
        return "flickr-meta"
    return None


def plan_file(
    dataset: str, uri: str, fmt: str, image_column: str, every: int, start: int, inside: tuple[str, ...]
) -> list[WorkUnit]:
    """The units of one record file, numbered from ``start``; ConfigError when it is not ``fmt``."""
    columns: tuple[str, ...] = ()
    if fmt == "msceleb-tsv":
        msceleb.check(uri)
        spans = lines.unit_spans(uri, every)
    elif fmt == "hf-parquet":
        columns, spans = hf_parquet.plan(uri, image_column, every)
    elif fmt == "flickr-meta":
        flickr.header(uri)  # ConfigError unless it names a URL column
        spans = flickr.unit_spans(uri, every)
    else:
        raise ConfigError(f"{fmt!r} is not a record format ({', '.join(FORMATS)})")
    return [
        WorkUnit(dataset, uri, fmt, start + i, (uri,), inside, span=tuple(span), columns=columns)
        for i, span in enumerate(spans)
    ]


def records(unit: WorkUnit, max_bytes: int) -> Iterator[Record]:
    """The records of one unit, in row order. A file that breaks part way (a truncated Parquet
    page, a file deleted since planning) ends the unit with one error record, like a broken tar."""
    (uri,) = unit.items
    if unit.kind == "msceleb-tsv":
        found = msceleb.records(uri, unit.span, max_bytes)
    elif unit.kind == "hf-parquet":
        found = hf_parquet.records(uri, unit.span, unit.columns, max_bytes)
    elif unit.kind == "flickr-meta":
        found = flickr.records(uri, unit.span)
    else:
        raise FatalError(f"unit {unit.key} has an unknown kind {unit.kind!r}")
    row = unit.span[0]
    try:
        for record in found:
            yield record
            row = int(record.source_uri.rsplit("#row=", 1)[1]) + 1
    except (OSError, ValueError, MemoryError, pa.ArrowException) as exc:  # e.g. a page claiming 1 TB
        yield Record(row_uri(uri, row), error=f"broken file: {type(exc).__name__}: {str(exc)[:150]}")
