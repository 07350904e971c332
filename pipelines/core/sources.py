"""Data set sources: split a source into deterministic work units, then read each unit's images.

A source (``DatasetSpec.source``) is one of:

* a folder, local or remote, walked recursively in sorted order of relative path; hidden entries
  (a path part starting with ".") and temporary files are skipped; tar files found in it become
  tar units, every other file is kept iff ``looks_like_image`` (its name or magic bytes);
* a glob (``shards/*.tar``, ``imgs/*``): the matching files, treated as in a folder;
* one ``.tar`` / ``.tar.gz`` / ``.tgz`` archive;
* a URI list file: ``.txt`` (one entry a line; blank and ``#`` lines skipped), ``.csv`` or
  ``.parquet`` (the column named url, uri, path or source_uri, else the first column; a .csv whose
  first line is already an entry has no header). Relative entries resolve against the list's
  folder; http(s) entries are fetched over HTTP;
* a file of records in a published data set format (``msceleb-tsv``, ``hf-parquet``,
  ``flickr-meta``), or a folder or glob of them: ``pipelines.core.readers`` plans each file into
  row-range units (kind = the format) and reads them; images they name by URL or path are read
  here like a URI list's entries.

``DatasetSpec.format`` says which; ``auto`` tells them apart by extension and first bytes, and a
source that is not of its declared format is a ConfigError.

Every item stays inside its data set (``roots``): a list entry outside the list's folder and the
allowed roots, and a file whose real path (symlinks resolved) leaves the folder, become error rows
with one reason, and nothing is opened for them. Local files are opened without blocking and read
only when they are regular files, at most ``max_bytes`` of them under a deadline: a device, a FIFO
or a socket is an error row, never a hang.

Loose files and list entries are chunked into units of ``unit_size`` items in listing order
(kinds "folder" and "urilist"); each tar is one unit of kind "tar" (a WebDataset shard), however
many members it has, because a tar can only be read from its start; a record file's units are
runs of ``unit_size`` rows. The same listing always gives the same units, hence the same keys.

Reading never raises for one bad record: a failure becomes ``RawImage(error=reason)``.
"""

from __future__ import annotations

import gzip
import logging
import os
import posixpath
import stat
import tarfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import BinaryIO, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from . import readers, roots, storage
from .config import DatasetSpec, HttpConfig
from .errors import ConfigError, FatalError, RecordError
from .formats import HEADER_BYTES, IMAGE_SUFFIXES, looks_like_image
from .records import RawImage, WorkUnit
from .roots import is_http
from .sources_http import HttpFetcher

log = logging.getLogger(__name__)
T = TypeVar("T")

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LIST_SUFFIXES = (".txt", ".csv", ".parquet")
LIST_COLUMNS = ("url", "uri", "path", "source_uri")  # in order of preference
GLOB_CHARS = "*?["
READ_CHUNK = 1 << 20
READ_THREADS = 16  # concurrent reads within one unit (HTTP is further limited per host)
SNIFF_THREADS = 16  # concurrent 16-byte reads while planning a folder of unnamed files
SNIFF_DEADLINE_S = 10.0
# Errors that mean an archive (or the rest of it) cannot be read.
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


# ---------------------------------------------------------------- planning


def plan_units(spec: DatasetSpec, unit_size: int) -> list[WorkUnit]:
    """The work units of ``spec.source``, in a fixed order; raises ConfigError for a bad source
    or one that is not of the data set's ``format``."""
    if unit_size < 1:
        raise ConfigError(f"unit_size must be at least 1, not {unit_size}")
    if spec.format == "unknown":
        raise ConfigError(f"data set {spec.name!r}: its format is unknown; set format: to one a reader takes")
    source = _normalize(spec.source)
    lower = source.lower()
    fmt = spec.format
    if not storage.exists(source):
        # A path that exists is taken as it is, even with "[" in a folder's name.
        if any(c in source for c in GLOB_CHARS):
            files = _glob(source)
            if fmt in readers.FORMATS:
                return _plan_records(spec, files, unit_size, _glob_root(source))
            return _plan_files(spec.name, source, files, unit_size, (_glob_root(source),))
        raise ConfigError(f"data set {spec.name!r}: source {source} does not exist")
    if _is_dir(source):
        if fmt in readers.FORMATS:
            return _plan_records(spec, _walk(source), unit_size, source)
        _expect(spec, fmt in ("auto", "folder"), "a folder")
        return _plan_files(spec.name, source, _walk(source), unit_size, (source,))
    _expect(spec, fmt != "folder", "a file")
    if fmt == "auto":
        fmt = readers.detect(source, spec.image_column) or fmt
    if fmt in readers.FORMATS:
        return _plan_records(spec, [source], unit_size, _parent(source), single=True)
    if lower.endswith(TAR_SUFFIXES) and fmt in ("auto", "tar"):
        return [WorkUnit(spec.name, source, "tar", 0, (source,), (source,))]
    if lower.endswith(LIST_SUFFIXES) and fmt in ("auto", "urls"):
        allowed = (_parent(source), *(_normalize(r) for r in spec.allowed_roots))
        return _chunk(spec.name, source, "urilist", _read_list(source), unit_size, allowed)
    _expect(spec, fmt == "auto", f"a {' or '.join(TAR_SUFFIXES if fmt == 'tar' else LIST_SUFFIXES)} file")
    raise ConfigError(
        f"data set {spec.name!r}: source {source} is not a folder, a glob, a tar archive "
        f"({', '.join(TAR_SUFFIXES)}), a URI list ({', '.join(LIST_SUFFIXES)}) or a file of a "
        f"record format ({', '.join(readers.FORMATS)})"
    )


def _expect(spec: DatasetSpec, ok: bool, found: str) -> None:
    if not ok:
        what = f"source {spec.source} is {found}, not of format {spec.format}"
        raise ConfigError(f"data set {spec.name!r}: {what}")


def _plan_records(
    spec: DatasetSpec, files: list[str], unit_size: int, folder: str, single: bool = False
) -> list[WorkUnit]:
    """The units of the record files (msceleb-tsv, hf-parquet, flickr-meta) among ``files``, in
    order. A ``single`` file that is not of its format is a ConfigError; in a folder or glob, files
    of the format's endings that are not of it (MS-Celeb's MID -> name TSV) are skipped with a
    warning, and a folder with none that is, is a ConfigError. A local file found in a folder must
    really be under it or the allowed roots (a symlink cannot lead out), as must what records name."""
    fmt = spec.format if spec.format in readers.FORMATS else None
    inside = (folder, *(_normalize(r) for r in spec.allowed_roots))
    units: list[WorkUnit] = []
    for uri in files:
        if not single and not uri.lower().endswith(readers.SUFFIXES[spec.format]):
            continue  # a folder's other files (a README, a licence) are not records
        try:
            if not single and storage.is_local(uri):  # a file named as the source is taken as named
                roots.check_real_path(uri, inside)
            found = fmt or readers.detect(uri, spec.image_column)
            if found is None:
                raise ConfigError(f"{uri} is not of a record format ({', '.join(readers.FORMATS)})")
            start = len(units)
            units += readers.plan_file(spec.name, uri, found, spec.image_column, unit_size, start, inside)
        except RecordError as exc:
            raise ConfigError(f"data set {spec.name!r}: {uri}: {exc.reason}") from None
        except ConfigError as exc:
            if single:
                raise
            log.warning("data set %r: skipped %s", spec.name, exc)
    if not units and not single:
        raise ConfigError(f"data set {spec.name!r}: no file of format {fmt} in {folder}")
    return units


def _plan_files(
    dataset: str, source: str, files: list[str], unit_size: int, inside: tuple[str, ...]
) -> list[WorkUnit]:
    tars = [f for f in files if f.lower().endswith(TAR_SUFFIXES)]
    images = _keep_images([f for f in files if not f.lower().endswith(TAR_SUFFIXES)], inside)
    units = _chunk(dataset, source, "folder", images, unit_size, inside)
    return units + _chunk(dataset, source, "tar", tars, 1, inside, start=len(units))


def _chunk(
    dataset: str,
    source: str,
    kind: str,
    items: Sequence[str],
    size: int,
    inside: tuple[str, ...],
    start: int = 0,
) -> list[WorkUnit]:
    offsets = range(0, len(items), size)
    return [
        WorkUnit(dataset, source, kind, start + i, tuple(items[o : o + size]), inside)
        for i, o in enumerate(offsets)
    ]


def _glob_root(pattern: str) -> str:
    """The folder a glob's matches are under: its path up to the first wildcard."""
    fixed = pattern[: min(pattern.index(c) for c in GLOB_CHARS if c in pattern)]
    return fixed.rsplit("/", 1)[0] if "/" in fixed else "."


def _normalize(source: str) -> str:
    """Local sources as absolute paths (so a source_uri names one file), others as proto://path."""
    try:
        fs, path = storage.url_to_fs(source)
    except (ImportError, ValueError) as exc:  # e.g. gs:// without gcsfs (the "gcs" extra)
        raise ConfigError(f"no file system for source {source}: {exc}") from exc
    return _to_uri(fs, path.rstrip("/") or "/")


def _to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return f"{protocol}://{path}"


def _is_dir(uri: str) -> bool:
    fs, path = storage.url_to_fs(uri)
    return fs.isdir(path)


def _hidden(name: str) -> bool:
    return name.startswith(".") or storage.TMP_MARK in name


def _hidden_path(relative: str) -> bool:
    return any(_hidden(part) for part in relative.split("/") if part not in ("", ".", ".."))


def _walk(root: str) -> list[str]:
    fs, path = storage.url_to_fs(root)
    if isinstance(fs, LocalFileSystem):
        return _walk_local(path)
    files = (uri for uri in storage.walk_files(root) if not uri.endswith("/"))
    return sorted(uri for uri in files if not _hidden_path(uri[len(root) :]))


def _walk_local(root: str) -> list[str]:
    # os.walk does not descend into symlinked folders (followlinks=False), so a link loop cannot
    # hang the walk; symlinked files are listed and read through the link. A link to nowhere or
    # a link loop is kept if its name says image and then fails to read (an error row).
    found = []
    for folder, dirs, names in os.walk(root, onerror=_walk_error):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        found += [os.path.join(folder, n) for n in names if not _hidden(n)]
    # Sorting full paths under one root sorts them by relative path.
    return sorted(found)


def _walk_error(exc: OSError) -> None:
    log.warning("cannot list %s: %s", exc.filename, exc.strerror)


def _glob(pattern: str) -> list[str]:
    fs, path = storage.url_to_fs(pattern)
    matches = fs.glob(path, detail=True)
    files = [p for p, info in matches.items() if info.get("type") == "file"]
    uris = sorted(_to_uri(fs, p) for p in files if not _hidden(posixpath.basename(p)))
    if not uris:
        raise ConfigError(f"source {pattern} matches no file")
    return uris


def _keep_images(files: list[str], inside: tuple[str, ...]) -> list[str]:
    """Files named as images, and unnamed files whose first bytes are an image's (read in parallel)."""
    unnamed = [f for f in files if not _named_image(f)]

    def sniff(uri: str) -> bool:
        return _sniff(uri, inside)

    with ThreadPoolExecutor(SNIFF_THREADS) as pool:
        sniffed = set(f for f, ok in zip(unnamed, pool.map(sniff, unnamed), strict=True) if ok)
    return [f for f in files if _named_image(f) or f in sniffed]


def _named_image(uri: str) -> bool:
    return posixpath.basename(uri).lower().endswith(IMAGE_SUFFIXES)


def _sniff(uri: str, inside: tuple[str, ...]) -> bool:
    try:
        head = _read_file(uri, HEADER_BYTES, inside, SNIFF_DEADLINE_S, whole=False)
    except (OSError, RecordError):  # unreadable and not named as an image: nothing says it is one
        return False
    return looks_like_image(posixpath.basename(uri), head)


# ---------------------------------------------------------------- URI lists


def _read_list(uri: str) -> list[str]:
    """The entries of a URI list, resolved against its folder."""
    try:
        if uri.lower().endswith(".txt"):
            entries = _txt_entries(uri)
        else:
            entries = _column_entries(_read_column(uri))
    except (OSError, UnicodeDecodeError, pa.ArrowException) as exc:
        raise ConfigError(f"cannot read URI list {uri}: {exc}") from exc
    base = _parent(uri)
    return [roots.resolve_entry(entry, base) for entry in entries]


def _txt_entries(uri: str) -> list[str]:
    lines = (line.strip() for line in storage.read_bytes(uri).decode("utf-8-sig").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _read_column(uri: str) -> pa.ChunkedArray | None:
    """The list column of a .csv or .parquet list (None when it has no column)."""
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        if not uri.lower().endswith(".csv"):
            parquet = pq.ParquetFile(f)
            name = _pick_column(parquet.schema_arrow.names)
            return parquet.read(columns=[name]).column(0) if name is not None else None
        table = pa_csv.read_csv(f)
        name = _pick_column(table.column_names)
        if name is not None and name == table.column_names[0] and _looks_like_entry(name):
            # No header: the first line is already an entry. Read again, naming columns f0, f1...
            f.seek(0)
            table = pa_csv.read_csv(f, read_options=pa_csv.ReadOptions(autogenerate_column_names=True))
            name = table.column_names[0]
        return table.column(name) if name is not None else None


def _pick_column(names: list[str]) -> str | None:
    by_lower = {name.lower(): name for name in reversed(names)}
    return next((by_lower[c] for c in LIST_COLUMNS if c in by_lower), names[0] if names else None)


def _looks_like_entry(name: str) -> bool:
    return "/" in name or name.lower().endswith(IMAGE_SUFFIXES)


def _column_entries(column: pa.ChunkedArray | None) -> list[str]:
    if column is None:
        return []
    stripped = (v.strip() for v in column.cast(pa.string()).to_pylist() if v is not None)
    return [v for v in stripped if v]


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "://" in uri else os.path.dirname(uri)


# ---------------------------------------------------------------- reading


def read_unit(unit: WorkUnit, http: HttpConfig) -> Iterator[RawImage]:
    """The occurrences of ``unit`` in its order; failures come as RawImage(error=...)."""
    if unit.kind == "tar":
        for tar_uri in unit.items:
            yield from _read_tar(unit.dataset, tar_uri, http.max_bytes)
    elif unit.kind in ("folder", "urilist"):
        yield from _read_items(unit, http)
    elif unit.kind in readers.FORMATS:
        yield from _read_records(unit, http)
    else:
        raise FatalError(f"unit {unit.key} has an unknown kind {unit.kind!r}")


def _read_items(unit: WorkUnit, http: HttpConfig) -> Iterator[RawImage]:
    fetcher = HttpFetcher(http) if any(is_http(u) for u in unit.items) else None

    def read(uri: str) -> RawImage:
        return _read_one(unit.dataset, uri, http, fetcher, unit.roots)

    try:
        yield from _ordered_map(read, unit.items, READ_THREADS)
    finally:
        if fetcher is not None:
            fetcher.close()


def _read_records(unit: WorkUnit, http: HttpConfig) -> Iterator[RawImage]:
    """A record file's unit: inline bytes as they are, URLs and paths read like a list's entries
    (inside the unit's roots, bounded), each with the record's address and provenance."""
    fetcher = HttpFetcher(http) if unit.kind == "flickr-meta" else None
    base = _parent(unit.items[0])

    def read(record: readers.Record) -> RawImage:
        raw = RawImage(unit.dataset, record.source_uri, record.data, record.error)
        if record.fetch is not None:
            uri = roots.resolve_entry(record.fetch, base)
            fetched = _read_one(unit.dataset, uri, http, fetcher, unit.roots)
            raw.data, raw.error = fetched.data, fetched.error
        raw.provenance = record.provenance
        return raw

    found = readers.records(unit, http.max_bytes)
    if unit.kind == "msceleb-tsv":  # its images are inline: nothing to wait for, no threads
        yield from map(read, found)
        return
    try:
        yield from _ordered_map(read, found, READ_THREADS)
    finally:
        if fetcher is not None:
            fetcher.close()


def _read_one(
    dataset: str, uri: str, http: HttpConfig, fetcher: HttpFetcher | None, inside: tuple[str, ...]
) -> RawImage:
    if inside and not roots.allowed(uri, inside):
        return RawImage(dataset, uri, error=roots.OUTSIDE)  # nothing opened, resolved or fetched
    try:
        if fetcher is not None and is_http(uri):
            data = fetcher.get(uri)
        else:
            data = _read_file(uri, http.max_bytes, inside, http.timeout_s)
    except RecordError as exc:
        return RawImage(dataset, uri, error=exc.reason)
    except Exception as exc:  # one bad record must not stop the unit, whatever went wrong
        return RawImage(dataset, uri, error=_reason(exc))
    return RawImage(dataset, uri, data=data)


def read_bounded(uri: str, max_bytes: int, deadline_s: float) -> bytes:
    """One file of any origin (a query photo) read as ingest reads a data set's: regular files
    only, at most ``max_bytes``, under a deadline; failures are RecordError("read", reason)."""
    try:
        return _read_file(uri, max_bytes, (), deadline_s)
    except RecordError:
        raise
    except Exception as exc:  # a missing file, a folder, a socket: a reason, not a traceback
        raise RecordError("read", _reason(exc)) from None


def _read_file(
    uri: str, max_bytes: int, inside: tuple[str, ...], deadline_s: float, whole: bool = True
) -> bytes:
    """At most ``max_bytes`` of a file (all of it when ``whole``, else its first bytes)."""
    fs, path = storage.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        real = roots.check_real_path(path, inside) if inside else path
        return _read_local(real, max_bytes, deadline_s, whole)
    if whole and fs.size(path) > max_bytes:
        raise RecordError("read", f"larger than max_bytes ({max_bytes})")
    if not whole:
        with fs.open(path, "rb") as f:
            return f.read(max_bytes)
    return fs.cat_file(path)


def _read_local(path: str, max_bytes: int, deadline_s: float, whole: bool) -> bytes:
    """Open without blocking (a FIFO with no writer would hang a plain open), accept only a regular
    file, and read at most ``max_bytes + 1`` bytes under one deadline."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RecordError("read", "not a regular file")
        if whole and info.st_size > max_bytes:
            raise RecordError("read", f"larger than max_bytes ({max_bytes})")
        return _read_fd(fd, max_bytes, time.monotonic() + deadline_s, whole)
    finally:
        os.close(fd)


def _read_fd(fd: int, max_bytes: int, deadline: float, whole: bool) -> bytes:
    chunks, total = [], 0
    while total <= max_bytes:
        if time.monotonic() > deadline:
            raise RecordError("read", "timed out")
        chunk = os.read(fd, min(READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if not whole and total >= max_bytes:
            return b"".join(chunks)[:max_bytes]
    if total > max_bytes:  # the file grew after its size was checked
        raise RecordError("read", f"larger than max_bytes ({max_bytes})")
    return b"".join(chunks)


def _ordered_map(fn: Callable[[T], RawImage], items: Iterable[T], threads: int) -> Iterator[RawImage]:
    """``fn`` over ``items`` (a list or a stream) on a thread pool, yielded in item order.

    At most ``2 * threads`` items are taken and pending at a time, so a slow first item cannot
    make the whole unit pile up in memory, nor a stream be read ahead further.
    """
    if isinstance(items, Sequence):
        if not items:
            return
        threads = min(threads, len(items))
    todo = iter(items)
    pool = ThreadPoolExecutor(threads)
    pending = deque(pool.submit(fn, item) for item in islice(todo, 2 * threads))
    try:
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(fn, item) for item in islice(todo, 1))
            yield result
    finally:
        for future in pending:  # the consumer stopped early: drop what has not started
            future.cancel()
        pool.shutdown(wait=True)


def _read_tar(dataset: str, tar_uri: str, max_bytes: int) -> Iterator[RawImage]:
    """Stream the members of one archive (plain or compressed, local or remote) without seeking."""
    try:
        raw, archive = _open_tar(tar_uri)
    except TAR_ERRORS as exc:
        # Nothing is known of its members: one row records that the archive failed.
        yield RawImage(dataset, tar_uri, error=f"cannot open archive: {_reason(exc)}")
        return
    with raw, archive:
        yield from _tar_members(dataset, tar_uri, archive, max_bytes)


def _open_tar(uri: str) -> tuple[BinaryIO, tarfile.TarFile]:
    fs, path = storage.url_to_fs(uri)
    raw = fs.open(path, "rb")
    try:
        return raw, tarfile.open(fileobj=_gunzipped(raw), mode="r|*")
    except BaseException:
        raw.close()
        raise


def _gunzipped(raw: BinaryIO) -> BinaryIO:
    """A gzip stream read through GzipFile, which inflates at most what each read asks for.
    tarfile's own stream mode inflates whole compressed blocks and copies what is left after
    every read, so skipping a gzip bomb's member costs quadratic time (256 MiB of zeros in a
    260 KiB .tar.gz: 100 s there, 3 s here)."""
    magic = raw.read(2)
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw


def _tar_members(dataset: str, tar_uri: str, archive: tarfile.TarFile, max_bytes: int) -> Iterator[RawImage]:
    while True:
        try:
            member = archive.next()
        except TAR_ERRORS as exc:
            yield RawImage(dataset, tar_uri, error=f"broken archive: {_reason(exc)}")
            return
        if member is None:
            return
        if not member.isfile() or _hidden_path(member.name):
            continue
        uri = f"{tar_uri}#{member.name}"
        try:
            data = _tar_member(archive, member, max_bytes)
        except RecordError as exc:
            yield RawImage(dataset, uri, error=exc.reason)
            continue
        except TAR_ERRORS as exc:
            # The stream position is lost with the member: the rest of the archive is unreadable.
            yield RawImage(dataset, uri, error=f"broken archive member: {_reason(exc)}")
            return
        if data is not None:
            yield RawImage(dataset, uri, data=data)


def _tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo, max_bytes: int) -> bytes | None:
    """The member's bytes, or None when it is not an image (a WebDataset's .json or .txt)."""
    f = archive.extractfile(member)
    if f is None:
        return None
    head = f.read(HEADER_BYTES)
    if not looks_like_image(member.name, head):
        return None
    if member.size > max_bytes:
        raise RecordError("read", f"larger than max_bytes ({max_bytes})")
    data = head + f.read()
    if len(data) != member.size:  # the archive ends inside this member
        raise tarfile.ReadError("truncated archive member")
    return data


def _reason(exc: BaseException) -> str:
    """A short reason for an error row: never bytes, at most 200 characters."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]
