"""Orphans: what interrupted attempts leave behind in a run folder, found and deleted.

Shards and temporary files hold face embeddings, which are biometric data, so nothing a crash
leaves may linger. In a run folder an orphan is

* a temporary file of an interrupted write (``storage.TMP_MARK`` in its name);
* a shard that no manifest will list: in a committed run, a part file its manifest does not list;
  in a run being resumed, a part file of a unit that is not in the plan (the listing changed);
  in an abandoned run (uncommitted, untouched for a while), every shard.

Never an orphan: a file a committed manifest lists, the manifest itself, a committed run's plan
(``_plan.json``), a file faceaudit does not write, anything in a run whose writer holds its lock
(``_run.lock``). The index side (unpublished builds) and the ``faceaudit gc`` command are in
``indexing/gc.py``; the helpers they share are here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from . import storage
from .locks import now_utc, parse_lock
from .writer import RUN_LOCK, RUN_MANIFEST, RUN_PLAN, is_committed, read_manifest

log = logging.getLogger(__name__)

BEAM_PLAN = "_beam-plan.jsonl"  # the Beam engine's unit plan, in the run's folder while it runs
BEAM_KNOWN = "_beam-known.jsonl"  # the Beam engine's images known from earlier runs (rebuild)
SHARD = re.compile(r"(faces|images)/part-[^/]+\.parquet")


@dataclass(frozen=True, slots=True)
class Entry:
    """One file under a listed folder."""

    uri: str
    rel: str  # relative to the listed folder, with "/"
    bytes: int
    mtime: float  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class Orphan:
    uri: str
    bytes: int
    why: str


def is_tmp(rel: str) -> bool:
    """A temporary file, or a file inside a temporary folder, of an interrupted write."""
    return any(storage.TMP_MARK in part for part in rel.split("/"))


def list_files(folder: str) -> list[Entry]:
    """Every file under ``folder`` (local or gs://) with its size and modification time."""
    fs, path = storage.url_to_fs(folder)
    if not fs.exists(path):
        return []
    root = path.rstrip("/")
    scheme = "" if storage.is_local(folder) else folder.split("://", 1)[0] + "://"
    out = []
    for name, info in sorted(fs.find(root, detail=True).items()):
        if info.get("type") == "directory":
            continue
        rel = name[len(root) :].lstrip("/")
        out.append(Entry(scheme + name, rel, int(info.get("size") or 0), _mtime(info)))
    return out


def _mtime(info: dict) -> float:
    """Local files carry ``mtime`` (seconds); GCS objects ``updated`` (RFC 3339)."""
    if isinstance(info.get("mtime"), (int, float)):
        return float(info["mtime"])
    stamp = info.get("updated") or info.get("timeCreated")
    if stamp is None:
        raise ValueError(f"no modification time for {info.get('name')}")
    return dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()


def newest(entries: Iterable[Entry]) -> float:
    return max((e.mtime for e in entries), default=0.0)


def faceaudit_file(rel: str) -> bool:
    """A file of a run folder that faceaudit writes and may delete (never the manifest)."""
    return is_tmp(rel) or bool(SHARD.fullmatch(rel)) or rel in (BEAM_PLAN, BEAM_KNOWN, RUN_PLAN, RUN_LOCK)


def run_writer_alive(run: str) -> bool:
    """A process holds the run's lock (``run.RunLock``): locally its flock is held (probed with a
    shared lock for an instant), on gs:// its lock object has not expired."""
    uri = storage.join(run, RUN_LOCK)
    if not storage.is_local(run):
        found, _ = storage.read_versioned(uri)
        held = parse_lock(found) if found else None
        return held is not None and not held.expired(now_utc())
    return bool(_flock_held(storage.url_to_fs(uri)[1], fcntl.LOCK_SH))  # its holder locks it exclusively


def run_orphans(run: str, older_than_s: float, now: float | None = None) -> list[Orphan]:
    """For ``faceaudit gc``: the orphans of one run folder, none younger than ``older_than_s``.

    A committed run keeps what its manifest lists, and its plan. An uncommitted run is left alone
    while its writer holds its lock, or while any of its files is younger than ``older_than_s`` (it
    may still be running); past that it is abandoned, and every shard of it goes.
    """
    now = time.time() if now is None else now
    files = list_files(run)
    if is_committed(run):
        listed = {s["file"] for s in read_manifest(run)["shards"]} | {RUN_MANIFEST, RUN_PLAN}
        return [
            Orphan(e.uri, e.bytes, "temporary file" if is_tmp(e.rel) else "not in the run's manifest")
            for e in files
            if e.rel not in listed and faceaudit_file(e.rel) and e.mtime <= now - older_than_s
        ]
    if newest(files) > now - older_than_s or run_writer_alive(run):
        return []
    ours = [e for e in files if faceaudit_file(e.rel)]
    if len(ours) == len(files):  # nothing but faceaudit's files: the folder goes whole
        return [Orphan(run, sum(e.bytes for e in files), f"abandoned unfinished run ({len(files)} files)")]
    return [Orphan(e.uri, e.bytes, "abandoned unfinished run") for e in ours]


def clean_run(run: str, planned_parts: set[str]) -> None:
    """For a run being resumed by the holder of its lock (so every earlier attempt with this run
    id is over): delete temporary files and the shards of units that are not in the run's
    persisted plan (``planned_parts``: its shard names). Shards of planned units stay: done
    units are kept, and pending units' shards are rewritten whole by this attempt."""
    found = []
    for e in list_files(run):
        if is_tmp(e.rel):
            found.append(Orphan(e.uri, e.bytes, "temporary file of a crashed attempt"))
        elif SHARD.fullmatch(e.rel) and e.rel.split("/", 1)[1] not in planned_parts:
            found.append(Orphan(e.uri, e.bytes, "shard of a unit that is not in the plan"))
    delete(found)


def remove_tmp(folder: str) -> None:
    """Delete the temporary files under ``folder`` (every writer there is known to be done)."""
    delete([Orphan(e.uri, e.bytes, "temporary file") for e in list_files(folder) if is_tmp(e.rel)])


def delete(orphans: list[Orphan]) -> int:
    """Delete each orphan (paths and sizes are logged, never contents); returns the bytes freed."""
    freed = 0
    for orphan in orphans:
        with contextlib.suppress(FileNotFoundError):
            storage.remove(orphan.uri)
            freed += orphan.bytes
            log.info("deleted %s (%d bytes): %s", orphan.uri, orphan.bytes, orphan.why)
    for orphan in orphans:
        if storage.is_local(orphan.uri):
            _remove_empty_tmp_dirs(orphan.uri)
    return freed


def _remove_empty_tmp_dirs(path: str) -> None:
    """A temporary folder (a shard's scratch folder) goes once its files are gone: climb from the
    file to the deepest temporary folder above it, removing each folder that is empty."""
    parts = path.split("/")
    marked = [i for i, part in enumerate(parts[:-1]) if storage.TMP_MARK in part]
    if not marked:
        return
    for depth in range(len(parts) - 1, marked[-1], -1):
        with contextlib.suppress(OSError):
            os.rmdir("/".join(parts[:depth]))  # only if empty


# ---------------------------------------------------------------- in progress, locally

BUILD_LOCK = ".faceaudit-build.lock"  # in a folder being written; flocked while its writer lives
ALIVE, DEAD = "alive", "dead"


@contextlib.contextmanager
def in_progress(folder: str) -> Iterator[None]:
    """Mark a local folder as being written by this process: a lock file in it, flocked until the
    process ends however it ends, so that clean-up knows a live writer from a killed one. The
    file is locked before it is renamed into place, so it is never seen unlocked while its writer
    lives. No-op for gs:// (clean-up there goes by age)."""
    if not storage.is_local(folder):
        yield
        return
    path = storage.url_to_fs(folder)[1]
    storage.make_dirs(path)
    marker = os.path.join(path, BUILD_LOCK)
    tmp = f"{marker}{storage.TMP_MARK}{os.getpid()}"
    fd = storage.create_private(tmp, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.replace(tmp, marker)
        yield
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)
    finally:
        os.close(fd)


def writer_state(folder: str) -> str | None:
    """ALIVE or DEAD for a local folder written under ``in_progress``; None when it is not known
    (no lock file: another kind of writer, or gs://)."""
    if not storage.is_local(folder):
        return None
    held = _flock_held(os.path.join(storage.url_to_fs(folder)[1], BUILD_LOCK), fcntl.LOCK_EX)
    return None if held is None else (ALIVE if held else DEAD)


def _flock_held(path: str, probe: int) -> bool | None:
    """Whether a live process holds a lock on the file ``path`` that conflicts with ``probe``
    (LOCK_SH or LOCK_EX), tried without waiting and let go at once; None when there is no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, probe | fcntl.LOCK_NB)
        return False
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
