"""Copies: the same photo re-encoded, resized or lightly cropped, found by its PDQ hash across and
within data sets, faces or not.

The index build writes one table, ``copies/part-0.parquet``, a row per distinct image (its bytes'
sha256) that any run holds, sorted by sha256: its PDQ hash and quality, the ``group`` it shares
with its near-duplicates, and every occurrence with the provenance the data set gave (data set,
version, source_uri, record_id, origin_url, page_url, owner, license). Images whose bytes could
not be read (no sha256) are left out: there is nothing to find them by.

Grouping: two images are copies when their hashes are at most ``pdq.MATCH_DISTANCE`` (31) bits
apart, PDQ's recommended threshold, and groups are the connected components of that relation
(so a chain of small edits stays one group). Only hashes of quality ``pdq.MIN_QUALITY`` (50) or
more take part: below it PDQ itself calls the hash unreliable (flat images hash alike), so such an
image keeps a group of its own and is found by its exact bytes, its URLs or its owner only.

The pairs come from a FAISS ``IndexBinaryFlat`` range search (distance < 32): an exact scan,
its cost growing with the square of the collection. ``IndexBinaryMultiHash`` (16 tables on 16-bit
slices probed with one bit flipped, exact for 31 bits since 31 < 2 x 16) should grow linearly, but
measured on this 2-core machine it never won (``bench/pdq.py --hashes N`` times both on the same
hashes; README, "Index and search", has the figures). By the square law the scan would take about a
day for ten million images (an extrapolation, not measured): a sharded scan or a tuned
multi-index belongs there.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from urllib.parse import urlsplit

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import erasure, pdq, storage
from pipelines.core.errors import FatalError

from . import bundle
from .errors import QueryError
from .lookup import copies_hash_rows, normal_url
from .runs import Run, iter_batches, verify_shard

TABLE = "copies/part-0.parquet"
HASHES = "copies/hashes-0.parquet"
PROVENANCE = ["record_id", "origin_url", "page_url", "owner", "license"]
OCCURRENCE = pa.struct([(name, pa.string()) for name in ("dataset", "version", "source_uri", *PROVENANCE)])
OCCURRENCE_KEYS = [f.name for f in OCCURRENCE]
SCHEMA = pa.schema(
    [
        ("group", pa.int64()),
        ("image_sha256", pa.string()),
        ("pdq", pa.binary(pdq.BYTES)),
        ("pdq_quality", pa.int16()),
        ("occurrences", pa.list_(OCCURRENCE)),
    ]
)
READ_COLUMNS = ["image_sha256", "dataset", "source_uri", *PROVENANCE, "pdq", "pdq_quality"]
QUERY_BATCH = 4096
FLICKR_ID = re.compile(r"(?:staticflickr\.com/\d+/(\d+)_|flickr\.com/photos/[^/]+/(\d+))")


# ---------------------------------------------------------------- grouping (pure)


def group_ids(hashes: np.ndarray, usable: np.ndarray, index: faiss.IndexBinary | None = None) -> np.ndarray:
    """Per row of ``hashes`` (uint8 [n, 32]), the smallest row number of its group: rows whose
    hashes lie at most ``MATCH_DISTANCE`` bits apart, transitively; rows not ``usable`` alone.
    ``index``: an empty binary index to search with (default: ``binary_index()``)."""
    n = len(hashes)
    parent = np.arange(n)
    rows = np.flatnonzero(usable)
    if len(rows) < 2:
        return parent
    index = index if index is not None else binary_index()
    codes = np.ascontiguousarray(hashes[rows], dtype=np.uint8)
    index.add(codes)
    for lo in range(0, len(rows), QUERY_BATCH):
        lims, _, found = index.range_search(codes[lo : lo + QUERY_BATCH], pdq.MATCH_DISTANCE + 1)  # < radius
        for i in range(len(lims) - 1):
            for j in found[lims[i] : lims[i + 1]]:
                _union(parent, int(rows[lo + i]), int(rows[j]))
    return np.array([_root(parent, i) for i in range(n)], dtype=np.int64)


def binary_index() -> faiss.IndexBinary:
    """The index the grouping searches: an exact scan (see the module's note for why)."""
    return faiss.IndexBinaryFlat(pdq.BITS)


def _root(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = int(parent[i])
    return i


def _union(parent: np.ndarray, a: int, b: int) -> None:
    ra, rb = _root(parent, a), _root(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)  # the smaller row number names the group


def hash_array(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, 32] hashes, bool [n] present) of a binary(32) column with nulls."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    present = pc.is_valid(arr).to_numpy(zero_copy_only=False) if len(arr) else np.zeros(0, bool)
    filled = pc.fill_null(arr, pa.scalar(bytes(pdq.BYTES), pa.binary(pdq.BYTES))) if len(arr) else arr
    raw = np.frombuffer(filled.buffers()[1], np.uint8) if len(arr) else np.zeros(0, np.uint8)
    start = filled.offset * pdq.BYTES if len(arr) else 0
    return raw[start : start + len(arr) * pdq.BYTES].reshape(-1, pdq.BYTES).copy(), present


# ---------------------------------------------------------------- build time


def image_rows(runs: list[Run], erased: erasure.ErasureSet) -> pa.Table:
    """Every distinct occurrence of every image the runs hold (erased images left out), with its
    hash; runs written before the PDQ and provenance columns give nulls there."""
    parts = []
    for run in runs:
        versions = {d["name"]: str(d.get("version", "")) for d in run.manifest.get("datasets", [])}
        for shard in run.images:
            verify_shard(shard)
            for batch in iter_batches(shard, READ_COLUMNS):
                table = pa.Table.from_batches([batch])
                table = table.filter(pc.is_valid(table.column("image_sha256")))
                names = table.column("dataset").to_pylist()
                table = table.append_column(
                    "version", pa.array([versions.get(n, "") for n in names], pa.string())
                )
                parts.append(table.select(["image_sha256", *OCCURRENCE_KEYS, "pdq", "pdq_quality"]))
    schema = (
        pa.schema([(c, pa.string()) for c in ["image_sha256", *OCCURRENCE_KEYS]])
        .append(pa.field("pdq", pa.binary(pdq.BYTES)))
        .append(pa.field("pdq_quality", pa.int16()))
    )
    table = pa.concat_tables([p.cast(schema) for p in parts]) if parts else schema.empty_table()
    return drop_erased(table, erased)


def drop_erased(table: pa.Table, erased: erasure.ErasureSet) -> pa.Table:
    """``table`` without the rows of images an erasure names (a face of them, or the whole image)."""
    if not erased or erased.keys is None or table.num_rows == 0:
        return table
    names = erased.images | erased.whole_images
    image = erased.keys.image
    keep = [image(s) not in names for s in table.column("image_sha256").to_pylist()]
    return table.filter(pa.array(keep, pa.bool_()))


def copies_table(rows: pa.Table) -> pa.Table:
    """One row per image from ``image_rows``' occurrences: grouped, sorted by sha256."""
    distinct = (
        rows.select(["image_sha256", *OCCURRENCE_KEYS])
        .group_by(["image_sha256", *OCCURRENCE_KEYS], use_threads=False)
        .aggregate([])
    )
    distinct = distinct.sort_by([(c, "ascending") for c in ["image_sha256", *OCCURRENCE_KEYS]])
    sha = distinct.column("image_sha256").combine_chunks()
    starts = _run_starts(sha)
    images = sha.take(pa.array(starts, pa.int64())) if len(sha) else pa.array([], pa.string())
    structs = pa.StructArray.from_arrays(
        [distinct.column(c).combine_chunks() for c in OCCURRENCE_KEYS], fields=list(OCCURRENCE)
    )
    offsets = pa.array(np.append(starts, len(sha)).astype(np.int32))
    occurrences = pa.ListArray.from_arrays(offsets, structs)
    hashed = rows.filter(pc.is_valid(rows.column("pdq")))
    where = pc.index_in(images, value_set=hashed.column("image_sha256").combine_chunks())
    found = pc.fill_null(where, 0)
    hashes = (
        hashed.column("pdq").combine_chunks().take(found)
        if hashed.num_rows
        else pa.nulls(len(images), SCHEMA.field("pdq").type)
    )
    quality = (
        hashed.column("pdq_quality").combine_chunks().take(found)
        if hashed.num_rows
        else pa.nulls(len(images), pa.int16())
    )
    missing = pc.is_null(where)
    hashes = pc.if_else(missing, pa.scalar(None, SCHEMA.field("pdq").type), hashes)
    quality = pc.if_else(missing, pa.scalar(None, pa.int16()), quality)
    codes, present = hash_array(hashes)
    q = pc.fill_null(quality, 0).to_numpy(zero_copy_only=False) if len(images) else np.zeros(0)
    groups = group_ids(codes, present & (q >= pdq.MIN_QUALITY))
    return pa.table(
        {
            "group": pa.array(groups, pa.int64()),
            "image_sha256": images,
            "pdq": hashes,
            "pdq_quality": quality,
            "occurrences": occurrences,
        },
        schema=SCHEMA,
    )


def _run_starts(sorted_values: pa.Array) -> np.ndarray:
    if len(sorted_values) == 0:
        return np.zeros(0, np.int64)
    change = pc.not_equal(sorted_values[1:], sorted_values[:-1]).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)


def write_copies(folder: str, runs: list[Run], erased: erasure.ErasureSet) -> dict:
    """Write the copies table and its range look-up hashes into the version ``folder``; the
    manifest's ``copies`` entry."""
    table = copies_table(image_rows(runs, erased))
    with tempfile.TemporaryDirectory(prefix="faceaudit-copies-") as scratch:
        entry = write_files(scratch, table)
        for key in ("table", "hashes"):
            name = entry[key]["file"]
            storage.move_in(os.path.join(scratch, name), storage.join(folder, name))
    return entry


def write_files(folder: str, table: pa.Table, names: tuple[str, str] = (TABLE, HASHES)) -> dict:
    """Write ``table`` and its hash table under the local ``folder``; their manifest entry."""
    storage.make_dirs(os.path.join(folder, "copies"))
    hashes = copies_hash_rows(table)
    for name, data in zip(names, (table, hashes), strict=True):
        pq.write_table(data, os.path.join(folder, name), compression="zstd")
    return {
        "table": {**bundle.file_entry(folder, names[0]), "rows": table.num_rows},
        "hashes": {**bundle.file_entry(folder, names[1]), "rows": hashes.num_rows},
        **summary(table),
        "max_distance": pdq.MATCH_DISTANCE,
        "min_quality": pdq.MIN_QUALITY,
    }


def summary(table: pa.Table) -> dict:
    """The counts the manifest's ``copies`` entry records of a copies table."""
    sizes = group_sizes(table)
    return {"groups_with_copies": int((sizes > 1).sum()), "images_with_copies": int(sizes[sizes > 1].sum())}


def group_sizes(table: pa.Table) -> np.ndarray:
    groups = table.column("group").to_numpy()
    return np.bincount(np.unique(groups, return_inverse=True)[1]) if len(groups) else np.zeros(0, np.int64)


# ---------------------------------------------------------------- query time


@dataclass(slots=True)
class Found:
    """One image a look-up found, directly (``via`` says how) or as a copy of one that was."""

    image_sha256: str
    group: int
    via: str  # bytes | pdq | url | owner | photo_id | copy (only in the group of one found directly)
    distance: int | None  # PDQ bits from the asked photo's hash, where PDQ found it
    occurrences: list[dict]
    matched: list[str]  # the data sets of the occurrences that matched (empty for a copy)


class Copies:
    """The copies table of one opened, verified bundle (``open`` gives None for a bundle built
    before it). Columns stay in Arrow and numpy: a question reads the rows it finds, not the
    table. Images an erasure names since the build are left out of every answer."""

    def __init__(self, table: pa.Table, erased: erasure.ErasureSet = erasure.EMPTY):
        self.table = table
        self.erased = erased
        self.shas = table.column("image_sha256").combine_chunks()
        self.groups = table.column("group").to_numpy()
        codes, present = hash_array(table.column("pdq"))
        quality = table.column("pdq_quality").fill_null(0).to_numpy() if table.num_rows else np.zeros(0)
        self.hashed = np.flatnonzero(present & (quality >= pdq.MIN_QUALITY))
        self.index = binary_index()
        self.index.add(np.ascontiguousarray(codes[self.hashed]))
        occurrences = table.column("occurrences").combine_chunks()
        self.flat = pc.list_flatten(occurrences)  # one entry per occurrence
        self.owner_row = pc.list_parent_indices(occurrences).to_numpy()  # its image's row

    @classmethod
    def open(cls, folder: str, manifest: dict, erased: erasure.ErasureSet = erasure.EMPTY) -> Copies | None:
        entry = (manifest.get("copies") or {}).get("table")
        if not entry:
            return None
        table = pq.read_table(bundle.inside_folder(folder, bundle.check_entry(entry, ".parquet")))
        if table.schema.names != SCHEMA.names:
            raise QueryError(f"{entry['file']}: not a copies table faceaudit writes")
        return cls(table, erased)

    def row_of(self, sha256: str | None) -> int | None:
        if not sha256:
            return None
        row = pc.index(self.shas, sha256).as_py()
        return None if row < 0 or self.is_erased(row) else row

    def is_erased(self, row: int) -> bool:
        names = self.erased.images | self.erased.whole_images
        return bool(
            self.erased and self.erased.keys and self.erased.keys.image(self.shas[row].as_py()) in names
        )

    def occurrences(self, row: int) -> list[dict]:
        return self.table.column("occurrences")[row].as_py()

    def rows_of_group(self, group: int) -> list[int]:
        return [int(r) for r in np.flatnonzero(self.groups == group) if not self.is_erased(int(r))]

    def found(self, direct: dict[int, tuple[str, int | None, list[str]]]) -> list[Found]:
        """The rows found directly (row -> (via, distance, matched data sets)) and every other
        row of their groups, group by group."""
        rows = {r: v for r, v in direct.items() if not self.is_erased(r)}
        for row in list(rows):
            for member in self.rows_of_group(int(self.groups[row])):
                rows.setdefault(member, ("copy", None, []))
        order = sorted(rows, key=lambda r: (int(self.groups[r]), rows[r][0] == "copy", self.shas[r].as_py()))
        return [
            Found(self.shas[r].as_py(), int(self.groups[r]), *rows[r][:2], self.occurrences(r), rows[r][2])
            for r in order
        ]

    def by_photo(self, sha256: str | None, hashes: list[tuple[bytes | None, int | None]]) -> list[Found]:
        """The photo's own bytes and every image within ``MATCH_DISTANCE`` bits of one of its
        ``hashes`` (the photo's, and of its central crops: ``pdq.hash_crops``) that has a quality
        of ``MIN_QUALITY`` or more, with their groups."""
        nearest: dict[int, int] = {}  # row -> bits from the nearest of the asked hashes
        queries = [code for code, quality in hashes if code is not None and (quality or 0) >= pdq.MIN_QUALITY]
        if queries and len(self.hashed):
            codes = np.frombuffer(b"".join(queries), np.uint8).reshape(-1, pdq.BYTES)
            _, distances, found = self.index.range_search(codes, pdq.MATCH_DISTANCE + 1)  # < radius
            for position, distance in zip(found, distances, strict=True):
                row = int(self.hashed[position])
                nearest[row] = min(int(distance), nearest.get(row, pdq.BITS))
        direct: dict[int, tuple[str, int | None, list[str]]] = {
            row: ("pdq", bits, self.datasets(row)) for row, bits in nearest.items()
        }
        own = self.row_of(sha256)
        if own is not None:
            direct[own] = ("bytes", nearest.get(own), self.datasets(own))
        return self.found(direct)

    def datasets(self, row: int, positions: np.ndarray | None = None) -> list[str]:
        """The data sets of the row's occurrences (of those at ``positions`` in the flat list)."""
        if positions is None:
            positions = np.flatnonzero(self.owner_row == row)
        names = pc.struct_field(self.flat.take(pa.array(positions, pa.int64())), "dataset")
        return sorted(set(names.to_pylist()))

    def matching(self, via: str, hits: np.ndarray) -> list[Found]:
        """The images with an occurrence where ``hits`` (a bool per flat occurrence) holds, each
        with the data sets of those occurrences, and their groups."""
        positions = np.flatnonzero(hits)
        rows = self.owner_row[positions]
        return self.found(
            {int(r): (via, None, self.datasets(int(r), positions[rows == r])) for r in np.unique(rows)}
        )

    def field(self, name: str) -> pa.Array:
        return pc.struct_field(self.flat, name)

    def by_url(self, url: str) -> list[Found]:
        """Occurrences whose ``source_uri``, ``origin_url`` or ``page_url`` normalises to ``url``'s
        form. Only values holding its path and query (which normalising keeps as given) are
        normalised one by one."""
        wanted = normal_url(url)
        parts = urlsplit(wanted)
        needle = (parts.path + ("?" + parts.query if parts.query else "")) if parts.netloc else wanted
        hits = np.zeros(len(self.flat), bool)
        names = ("source_uri", "origin_url", "page_url")
        self._confirm(hits, names, needle, lambda v: normal_url(v) == wanted)
        return self.matching("url", hits)

    def by_owner(self, owner: str) -> list[Found]:
        wanted = owner.strip()
        hits = pc.fill_null(pc.equal(self.field("owner"), wanted), False).to_numpy(zero_copy_only=False)
        return self.matching("owner", hits & bool(wanted))

    def by_flickr_photo(self, photo_id: str) -> list[Found]:
        """The records whose id is ``photo_id``, or whose Flickr URL names it."""
        wanted = photo_id.strip()
        if not wanted.isdigit():
            return []
        hits = pc.fill_null(pc.equal(self.field("record_id"), wanted), False).to_numpy(zero_copy_only=False)
        names = ("origin_url", "page_url", "source_uri")
        self._confirm(hits, names, wanted, lambda v: flickr_photo_id(v) == wanted)
        return self.matching("photo_id", hits)

    def _confirm(self, hits: np.ndarray, names: tuple[str, ...], needle: str, check) -> None:
        """Mark in ``hits`` the rows where one of the ``names`` columns holds ``needle`` (a cheap
        substring scan in Arrow) and ``check`` confirms it (parsed, on those few rows only)."""
        for name in names:
            values = self.field(name)
            maybe = pc.fill_null(pc.match_substring(values, needle), False).to_numpy(zero_copy_only=False)
            for position in np.flatnonzero(maybe & ~hits):
                hits[position] = check(values[int(position)].as_py())

    def copy_counts(self, sha256: str) -> dict[str, int] | None:
        """Per data set, how many occurrences the image's group has (its own included); None when
        the table does not know the image."""
        row = self.row_of(sha256)
        if row is None:
            return None
        counts: dict[str, int] = {}
        for member in self.rows_of_group(int(self.groups[row])):
            for occ in self.occurrences(member):
                counts[occ["dataset"]] = counts.get(occ["dataset"], 0) + 1
        return dict(sorted(counts.items()))


def flickr_photo_id(url: str | None) -> str | None:
    """The photo id a Flickr image or page URL carries, if it is one."""
    match = FLICKR_ID.search(url or "")
    return (match.group(1) or match.group(2)) if match else None


def check_table(table: pa.Table, where: str) -> None:
    if table.schema.names != SCHEMA.names:
        raise FatalError(f"{where}: not a copies table faceaudit writes")
