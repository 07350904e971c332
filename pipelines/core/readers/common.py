"""What every record reader shares: the record it yields and the limits on what it keeps."""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import PROVENANCE_FIELDS

# A provenance value longer than this is cut: a hostile file cannot bloat every row it names.
MAX_FIELD_CHARS = 2048
# How many metadata bytes one line may hold besides its image (URLs, ids, a face rectangle).
LINE_SLACK_BYTES = 64 << 10


@dataclass(slots=True)
class Record:
    """One record of a data set file: its image bytes, or a URI to read them from, or why
    neither. ``source_uri`` is the record's address inside the data set (``<file>#row=<n>``)."""

    source_uri: str
    data: bytes | None = None
    fetch: str | None = None  # read as a URI list's entry is read (roots, HTTP limits)
    error: str | None = None
    provenance: dict[str, str] | None = None


def row_uri(file_uri: str, row: int) -> str:
    return f"{file_uri}#row={row}"


def provenance(**values: object) -> dict[str, str] | None:
    """The non-empty provenance ``values`` as short strings; only PROVENANCE_FIELDS are kept, so
    an identity label can never slip into a row by a typo of a key."""
    kept = {}
    for key, value in values.items():
        if key not in PROVENANCE_FIELDS:
            raise ValueError(f"{key!r} is not a provenance field")
        text = _text(value)
        if text:
            kept[key] = text
    return kept or None


def _text(value: object) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value).strip()
    # no control characters: a value may be shown in a terminal or a report
    if not text.isprintable():
        text = "".join(c for c in text if c.isprintable())
    return text[:MAX_FIELD_CHARS] or None
