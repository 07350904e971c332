"""Flickr (YFCC100M) metadata, as MegaFace and IBM Diversity in Faces publish it: a CSV (a header
line, one photo a line) or JSONL (one JSON object a line) naming each photo's URL and, where
present, its Flickr photo id, its owner's NSID and its licence. The photos are fetched over HTTP
as a URI list's entries are. Every other column (titles, user names, tags, identity ids) is never
read into a row."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator

from ..errors import ConfigError
from . import lines
from .common import Record, provenance, row_uri

# Accepted column names, in order of preference (compared in lower case).
URL_COLUMNS = ("url", "photo_url", "download_url", "image_url", "flickr_url", "url_o", "url_b", "uri")
PHOTO_ID_COLUMNS = ("photo_id", "photoid", "flickr_id", "flickr_photo_id", "id")
OWNER_COLUMNS = ("owner", "nsid", "owner_nsid", "user_nsid")
LICENSE_COLUMNS = ("license", "licence", "license_name", "license_url")
PAGE_COLUMNS = ("page_url", "photo_page_url", "flickr_page_url", "page")
FLICKR_COLUMNS = (*PHOTO_ID_COLUMNS[:-1], *OWNER_COLUMNS, *LICENSE_COLUMNS)  # say "Flickr", not "URI list"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
MAX_LINE_BYTES = 64 << 10


def is_jsonl(uri: str) -> bool:
    return uri.lower().endswith(JSONL_SUFFIXES)


def header(uri: str) -> list[str] | None:
    """A CSV's column names (lower case), or None for JSONL; ConfigError when neither has a URL."""
    if is_jsonl(uri):
        first = lines.first_line(uri, MAX_LINE_BYTES)
        try:
            obj = json.loads(first) if first.strip() else None
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            raise ConfigError(f"{uri} is not flickr-meta JSONL: its first line is not a JSON object")
        return None
    names = _csv_fields(lines.first_line(uri, MAX_LINE_BYTES))
    columns = [n.strip().lower() for n in names or []]
    if _pick(columns, URL_COLUMNS) is None:
        raise ConfigError(
            f"{uri} is not flickr-meta CSV: its header names no URL column ({', '.join(URL_COLUMNS)})"
        )
    return columns


def looks_like_flickr(uri: str) -> bool:
    """A .csv whose header names a URL column and a Flickr one (photo id, owner, licence)."""
    try:
        columns = header(uri)
    except (ConfigError, OSError, UnicodeDecodeError):
        return False
    return columns is None or _pick(columns, FLICKR_COLUMNS) is not None


def unit_spans(uri: str, every: int) -> list[tuple[int, int, int]]:
    return lines.unit_spans(uri, every, skip_lines=0 if is_jsonl(uri) else 1)


def records(uri: str, span: tuple[int, ...]) -> Iterator[Record]:
    """The photos of one unit's rows: a URL to fetch with its provenance, or an error."""
    columns = None if is_jsonl(uri) else header(uri)
    first_row, start, stop = span
    for row, line in lines.read_lines(uri, start, stop, first_row, MAX_LINE_BYTES):
        where = row_uri(uri, row)
        if line is None:
            yield Record(where, error=f"row longer than {MAX_LINE_BYTES} bytes")
        elif line.strip():
            yield _record(where, line, columns)


def _record(where: str, line: bytes, columns: list[str] | None) -> Record:
    try:
        fields = _json_fields(line) if columns is None else _csv_row(line, columns)
    except ValueError as exc:
        return Record(where, error=str(exc))
    url = fields.get(_pick(list(fields), URL_COLUMNS) or "")
    if not isinstance(url, str) or not url.strip():
        return Record(where, error="no URL in the row" if url in (None, "") else "the URL is not a string")
    url = url.strip()

    def value(names: tuple[str, ...]) -> object:
        column = _pick(list(fields), names)
        found = fields.get(column) if column else None
        return found if isinstance(found, (str, int)) else None  # a nested value is no id

    kept = provenance(
        record_id=value(PHOTO_ID_COLUMNS),
        origin_url=url,
        page_url=value(PAGE_COLUMNS),
        owner=value(OWNER_COLUMNS),
        license=value(LICENSE_COLUMNS),
    )
    return Record(where, fetch=url, provenance=kept)


def _json_fields(line: bytes) -> dict:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # a line of 64k "[" nests past the interpreter's limit
        raise ValueError("not a JSON object (broken JSON)") from None
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object (a {type(obj).__name__})")
    return {str(k).lower(): v for k, v in obj.items()}


def _csv_row(line: bytes, columns: list[str]) -> dict:
    values = _csv_fields(line)
    if values is None:
        raise ValueError("not a CSV row (broken quoting)")
    if len(values) < len(columns):
        raise ValueError(f"truncated row: {len(values)} of {len(columns)} columns")
    return dict(zip(columns, values, strict=False))


def _csv_fields(line: bytes) -> list[str] | None:
    try:
        return next(csv.reader([line.decode("utf-8-sig", "replace")], strict=True), [])
    except csv.Error:
        return None


def _pick(columns: list[str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in columns), None)
