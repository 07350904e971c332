"""A data set's fingerprint: its version plus a digest of its source listing.

The listing is what ``plan_units`` would read (the same files, tar shards or list entries), each
with its size and, where the store has one, an etag/checksum (GCS: md5 or crc32c; local: the
modification time, since a local file has no cheaper content tag). A changed fingerprint means the
data set is ingested again; inside it only bytes never embedded before reach the model, so a
false "changed" costs a listing and a read, never an embedding.
"""

from __future__ import annotations

import hashlib

from pipelines.core import storage
from pipelines.core.config import DatasetSpec
from pipelines.core.sources import plan_units

# Listing is all we need; the unit size only decides how items are grouped.
_LISTING_UNIT = 1 << 30
_TAG_KEYS = ("md5Hash", "crc32c", "etag", "ETag", "generation", "mtime")


def fingerprint(spec: DatasetSpec) -> str:
    """``<version>:<16 hex of the listing digest>``; raises ConfigError for a missing source."""
    digest = hashlib.sha256()
    for line in listing(spec):
        digest.update(line.encode())
        digest.update(b"\n")
    return f"{spec.version}:{digest.hexdigest()[:16]}"


def listing(spec: DatasetSpec) -> list[str]:
    """One line per item the source holds: its locator, size and tag (in plan order)."""
    lines: list[str] = []
    folders: dict[str, dict[str, str]] = {}
    for unit in plan_units(spec, _LISTING_UNIT):
        if unit.kind == "urilist":
            # entries may be http(s) URLs: a HEAD per entry is too dear; the list itself is stat'ed
            lines.append(f"list {stat_line(unit.source)}")
            lines.extend(unit.items)
            continue
        if unit.kind == "folder" and unit.source not in folders:
            folders[unit.source] = _bulk_stats(unit.source)
        stats = folders.get(unit.source, {})
        lines.extend(stats.get(_path(item)) or stat_line(item) for item in unit.items)
    return lines


def stat_line(uri: str) -> str:
    fs, path = storage.url_to_fs(uri)
    return _describe(path, fs.info(path))


def _bulk_stats(root: str) -> dict[str, str]:
    """path -> stat line for every file under a folder, from one recursive listing."""
    fs, path = storage.url_to_fs(root)
    if not fs.isdir(path):
        return {}
    return {p: _describe(p, info) for p, info in fs.find(path, detail=True).items()}


def _describe(path: str, info: dict) -> str:
    tag = next((str(info[k]) for k in _TAG_KEYS if info.get(k) not in (None, "")), "")
    return f"{path}\t{info.get('size')}\t{tag}"


def _path(uri: str) -> str:
    return storage.url_to_fs(uri)[1]
