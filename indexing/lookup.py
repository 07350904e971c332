"""Identifier look-up with k-anonymity: SHA-256 of a source URL or of an image's bytes -> data sets.

Like Have I Been Pwned's range API: a person hashes their own URL (normalised, ``normal_url``) or
their file's bytes, sends the first 5 hex characters (20 bits) and gets back every known hash with
that prefix; the match happens on their side, so the server never learns which URL or photo was
asked about. With 2 million known hashes a prefix answers about 2 of them.

The tables are built at index build time beside the metadata, one per bundle shard
(``lookup/hashes-<k>.parquet``, listed in the shard's manifest entry under ``hashes`` with its
sha256 like every other bundle file): a row per distinct hash among the shard's faces, both kinds,
sorted by hash, with the data sets it occurs in and the image it leads to (so that images holding
an erased face are left out at query time; see ``RangeTables.range``). Bundles with a copies table
(``indexing/copies.py``) add one more, ``copies/hashes-0.parquet``, built from every image the
runs hold, faceless ones included, keyed by its bytes and by its ``source_uri``, ``origin_url``
and ``page_url``: one pass over a table the build writes anyway.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import erasure, storage

from . import bundle
from .errors import QueryError

PREFIX_HEX = 5
PREFIX = re.compile(r"[0-9a-fA-F]{5}")
DEFAULT_PORTS = {"http": 80, "https": 443}
SCHEMA = pa.schema(
    [
        ("hash", pa.binary(32)),
        ("kind", pa.dictionary(pa.int8(), pa.string())),  # url | image
        ("image_sha256", pa.string()),
        ("datasets", pa.list_(pa.string())),
    ]
)


def normal_url(url: str) -> str:
    """The form a URL is hashed in: scheme and host lower-cased, a default port, credentials and the
    fragment dropped, an empty path made ``/``; path and query as given. The page does the same
    with the browser's URL parser (pipelines/service/page/lookup.js). Anything without a scheme
    and host (a local path, ``gs://`` objects keep theirs) is hashed as it is."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return text
    scheme = parts.scheme.lower()
    if not scheme or not parts.hostname:
        return text
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    path = parts.path or ("/" if scheme in DEFAULT_PORTS else "")
    return urlunsplit((scheme, host, path, parts.query, ""))


def url_hash(url: str) -> str:
    return hashlib.sha256(normal_url(url).encode("utf-8")).hexdigest()


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not PREFIX.fullmatch(prefix):
        raise QueryError(f"a range prefix is {PREFIX_HEX} hex characters, not {str(prefix)[:16]!r}")
    return prefix.lower()


# ---------------------------------------------------------------- build time


def table_name(k: int) -> str:
    return f"lookup/hashes-{k}.parquet"


def hash_rows(meta: pa.Table) -> pa.Table:
    """One row per distinct (hash) among the faces in ``meta`` (image_sha256, occurrences)."""
    found: dict[bytes, tuple[str, str, set[str]]] = {}
    shas = meta.column("image_sha256").to_pylist()
    for sha, occurrences in zip(shas, meta.column("occurrences").to_pylist(), strict=True):
        names = {o["dataset"] for o in occurrences}
        key = bytes.fromhex(sha)
        found.setdefault(key, ("image", sha, set()))[2].update(names)
        for occ in occurrences:
            key = hashlib.sha256(normal_url(occ["source_uri"]).encode("utf-8")).digest()
            found.setdefault(key, ("url", sha, set()))[2].add(occ["dataset"])
    keys = sorted(found)
    return pa.table(
        {
            "hash": pa.array(keys, pa.binary(32)),
            "kind": pa.array([found[k][0] for k in keys]).dictionary_encode().cast(SCHEMA.field("kind").type),
            "image_sha256": pa.array([found[k][1] for k in keys], pa.string()),
            "datasets": pa.array([sorted(found[k][2]) for k in keys], pa.list_(pa.string())),
        },
        schema=SCHEMA,
    )


def copies_hash_rows(copies: pa.Table) -> pa.Table:
    """The range table of the copies table (``indexing/copies.py``): every image the runs hold,
    faces or not, by its bytes and by each normalised ``source_uri``, ``origin_url`` and
    ``page_url`` of its occurrences."""
    found: dict[bytes, tuple[str, str, set[str]]] = {}
    shas = copies.column("image_sha256").to_pylist()
    for sha, occurrences in zip(shas, copies.column("occurrences").to_pylist(), strict=True):
        found.setdefault(bytes.fromhex(sha), ("image", sha, set()))[2].update(
            o["dataset"] for o in occurrences
        )
        for occ in occurrences:
            for url in {occ[k] for k in ("source_uri", "origin_url", "page_url") if occ.get(k)}:
                key = hashlib.sha256(normal_url(url).encode("utf-8")).digest()
                found.setdefault(key, ("url", sha, set()))[2].add(occ["dataset"])
    return _table(found)


def _table(found: dict[bytes, tuple[str, str, set[str]]]) -> pa.Table:
    keys = sorted(found)
    return pa.table(
        {
            "hash": pa.array(keys, pa.binary(32)),
            "kind": pa.array([found[k][0] for k in keys], pa.string())
            .dictionary_encode()
            .cast(SCHEMA.field("kind").type),
            "image_sha256": pa.array([found[k][1] for k in keys], pa.string()),
            "datasets": pa.array([sorted(found[k][2]) for k in keys], pa.list_(pa.string())),
        },
        schema=SCHEMA,
    )


def add_tables(folder: str, shards: list[dict]) -> None:
    """Write each shard's hash table beside its metadata and list it in the shard's entry
    (``hashes``); the manifest, written after, covers it by sha256 like every other file."""
    with tempfile.TemporaryDirectory(prefix="faceaudit-lookup-") as scratch:
        storage.make_dirs(os.path.join(scratch, "lookup"))
        for k, entry in enumerate(shards):
            fs, path = storage.url_to_fs(storage.join(folder, entry["metadata"]["file"]))
            with fs.open(path, "rb") as f:
                meta = pq.read_table(f, columns=["image_sha256", "occurrences"])
            name = table_name(int(entry.get("shard", k)))
            table = hash_rows(meta)
            pq.write_table(table, os.path.join(scratch, name), compression="zstd")
            entry["hashes"] = {**bundle.file_entry(scratch, name), "rows": table.num_rows}
            storage.move_in(os.path.join(scratch, name), storage.join(folder, name))


# ---------------------------------------------------------------- query time


@dataclass(slots=True)
class RangeMatch:
    suffix: str
    datasets: list[str]
    kind: str = ""


@dataclass(slots=True)
class _Table:
    starts: np.ndarray  # uint32: the first 20 bits of each sorted hash
    table: pa.Table


@dataclass(slots=True)
class RangeTables:
    """Every shard's table of one opened bundle; ``range(prefix)`` answers a k-anonymous look-up."""

    tables: list[_Table] = field(default_factory=list)
    rows: int = 0

    @property
    def available(self) -> bool:
        return bool(self.tables)

    @classmethod
    def open(cls, folder: str, manifest: dict) -> RangeTables:
        """The tables of a verified local bundle folder (a bundle built before they existed, or
        re-sharded by an export, has none: ``available`` is False)."""
        out = cls()
        entries = [shard.get("hashes") for shard in manifest["shards"]]
        if not all(entries):
            return cls()  # partial tables would answer "not found" for what is there
        copies = (manifest.get("copies") or {}).get("hashes")
        for entry in [*entries, *([copies] if copies else [])]:  # copies: faceless images too
            path = bundle.inside_folder(folder, bundle.check_entry(entry, ".parquet"))
            table = pq.read_table(path, memory_map=True)
            if table.schema.names != SCHEMA.names:
                raise QueryError(f"{entry['file']}: not a hash table faceaudit writes")
            hashes = table.column("hash").combine_chunks()
            raw = np.frombuffer(hashes.buffers()[1], dtype=np.uint8) if len(hashes) else np.zeros(0, np.uint8)
            raw = raw[hashes.offset * 32 : (hashes.offset + len(hashes)) * 32]
            heads = raw.reshape(-1, 32)[:, :4].copy().view(">u4").ravel() >> 12
            out.tables.append(_Table(heads.astype(np.uint32), table))
            out.rows += table.num_rows
        return out

    def range(self, prefix: str, erased: erasure.ErasureSet = erasure.EMPTY) -> list[RangeMatch]:
        """Every known hash starting with ``prefix``: its remaining 59 hex digits and data sets.
        Hashes that lead to an image holding an erased face are left out."""
        head = int(check_prefix(prefix), 16)
        merged: dict[str, RangeMatch] = {}
        for t in self.tables:
            lo, hi = np.searchsorted(t.starts, [head, head + 1])
            if lo == hi:
                continue
            rows = t.table.slice(int(lo), int(hi - lo)).to_pylist()
            for row in rows:
                if (
                    erased
                    and erased.keys is not None
                    and erased.keys.image(row["image_sha256"]) in erased.images
                ):
                    continue
                suffix = row["hash"].hex()[PREFIX_HEX:]
                match = merged.setdefault(suffix, RangeMatch(suffix, [], str(row["kind"])))
                match.datasets = sorted(set(match.datasets) | set(row["datasets"]))
        return [merged[s] for s in sorted(merged)]

    def find(self, sha256_hex: str, erased: erasure.ErasureSet = erasure.EMPTY) -> RangeMatch | None:
        """The full-hash look-up the CLI and the page do on their side of a range answer."""
        sha = sha256_hex.lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise QueryError("a SHA-256 is 64 hex characters")
        for match in self.range(sha[:PREFIX_HEX], erased):
            if match.suffix == sha[PREFIX_HEX:]:
                return match
        return None
