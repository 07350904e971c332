"""MS-Celeb-1M's TSV files: one face a line, seven tab-separated columns: the Freebase MID, the
image search rank, the image URL, the page URL, the face id, the face rectangle (base64) and the
face crop (a base64 JPEG).

The MID names a person and the rank only orders a search for that name: both are dropped here,
never decoded, kept or logged. The face rectangle locates the crop in a photo this tool does not
have, so it is dropped too. What is kept: the face id (``record_id``), the image URL
(``origin_url``) and the page URL (``page_url``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator

from ..errors import ConfigError
from . import lines
from .common import LINE_SLACK_BYTES, Record, provenance, row_uri

COLUMNS = 7
IMAGE_URL, PAGE_URL, FACE_ID, FACE_DATA = 2, 3, 4, 6
SUFFIXES = (".tsv",)


def line_limit(max_bytes: int) -> int:
    """The longest line kept: a base64 image of ``max_bytes`` and the other columns."""
    return max_bytes * 4 // 3 + 4 + LINE_SLACK_BYTES


def looks_like(uri: str) -> bool:
    """Whether the first line has the seven columns (never more than 1 MiB of it is read)."""
    head = lines.first_line(uri, 1 << 20)
    return head.count(b"\t") == COLUMNS - 1


def check(uri: str) -> None:
    if not looks_like(uri):
        raise ConfigError(
            f"{uri} is not an MS-Celeb TSV: its first line has not {COLUMNS} tab-separated columns"
        )


def records(uri: str, span: tuple[int, ...], max_bytes: int) -> Iterator[Record]:
    first_row, start, stop = span
    for row, line in lines.read_lines(uri, start, stop, first_row, line_limit(max_bytes)):
        where = row_uri(uri, row)
        if line is None:
            yield Record(where, error=f"row longer than max_bytes allows ({max_bytes})")
        elif line.strip():
            yield _record(where, line, max_bytes)


def _record(where: str, line: bytes, max_bytes: int) -> Record:
    fields = line.split(b"\t")
    if len(fields) != COLUMNS:
        return Record(where, error=f"truncated or malformed row: {len(fields)} of {COLUMNS} columns")
    kept = provenance(record_id=fields[FACE_ID], origin_url=fields[IMAGE_URL], page_url=fields[PAGE_URL])
    try:
        data = base64.b64decode(fields[FACE_DATA], validate=True)
    except (binascii.Error, ValueError):
        return Record(where, error="face data is not valid base64", provenance=kept)
    if not data:
        return Record(where, error="face data is empty", provenance=kept)
    if len(data) > max_bytes:
        return Record(where, error=f"larger than max_bytes ({max_bytes})", provenance=kept)
    return Record(where, data=data, provenance=kept)
