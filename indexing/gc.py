"""Crash debris: what crashed runs and index builds left behind (it holds biometric data).

Under an ``<out>`` root (its ``runs/``), a run folder or an index root, local or ``gs://``:

* runs: temporary files, shards no manifest lists, abandoned unfinished runs
  (``pipelines.core.orphans.run_orphans``);
* index roots: temporary files, files a committed version's manifest does not list, and version
  folders of builds that never wrote their manifest.

Never deleted: anything a committed manifest lists, a manifest, the version CURRENT names, a file
faceaudit does not write, and anything that may still be in progress: modified within
``--older-than``, or (locally) a version folder whose build still holds its lock file
(``orphans.in_progress``). A local build folder whose lock file is there but unlocked was left by
a build that died, and goes whatever its age.

The index build calls ``clean_unpublished`` before it starts, so a killed build's folder goes with
the next build over the same index (runs clean up in ``plan_run``).
"""

from __future__ import annotations

import re
import time

from pipelines.core import storage
from pipelines.core.orphans import (
    ALIVE,
    BUILD_LOCK,
    DEAD,
    Entry,
    Orphan,
    delete,
    is_tmp,
    list_files,
    newest,
    run_orphans,
    writer_state,
)
from pipelines.core.writer import RUN_MANIFEST

from . import bundle

DEFAULT_OLDER_THAN = "6h"
VERSION = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")  # indexing.bundle.new_version's names
CURRENT_TMP = f".CURRENT{storage.TMP_MARK}"  # storage.write_atomic's temporary name for CURRENT
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``6h``, ``2d`` or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (examples: 90s, 30m, 6h, 2d)")
    return float(match.group(1)) * UNITS.get(match.group(2) or "s", 1)


def find_orphans(uri: str, older_than_s: float, now: float | None = None) -> list[Orphan]:
    """Every orphan under ``uri``: the runs of an <out> root or a run folder, and an index root."""
    now = time.time() if now is None else now
    uri = uri.rstrip("/")
    names = storage.listdir(uri)
    if RUN_MANIFEST in names or "faces" in names or "images" in names:
        return run_orphans(uri, older_than_s, now)
    found: list[Orphan] = []
    for run_id in storage.listdir(storage.join(uri, "runs")):
        found += run_orphans(storage.join(uri, "runs", run_id), older_than_s, now)
    return found + index_orphans(uri, older_than_s, now)


def index_orphans(
    root: str, older_than_s: float, now: float | None = None, next_build: bool = False
) -> list[Orphan]:
    """The orphans of an index root (nothing if it holds no versions).

    ``next_build``: the clean-up an index build does first, holding the root's folder lock (under
    which CURRENT is written), so CURRENT's temporary files go whatever their age.
    """
    now = time.time() if now is None else now
    files = [e for e in list_files(root) if e.rel.split("/", 1)[0] != "runs"]  # runs: run_orphans
    current = _current(root)
    found = []
    for top, entries in _by_top(files).items():
        if len(entries) == 1 and entries[0].rel == top:  # a file at the root
            stale = entries[0].mtime <= now - older_than_s or (next_build and top.startswith(CURRENT_TMP))
            if is_tmp(top) and stale:
                found.append(Orphan(entries[0].uri, entries[0].bytes, "temporary file"))
        elif VERSION.fullmatch(top):
            found += _version_orphans(storage.join(root, top), top, entries, current, older_than_s, now)
    return found


def _version_orphans(
    folder: str, name: str, entries: list[Entry], current: str | None, older_than_s: float, now: float
) -> list[Orphan]:
    inside = {e.rel[len(name) + 1 :]: e for e in entries}
    if bundle.MANIFEST in inside:
        try:
            manifest = bundle.parse_manifest(storage.read_bytes(storage.join(folder, bundle.MANIFEST)))
        except bundle.IntegrityError:
            return []  # a damaged committed version is for `faceaudit verify` and a person, not gc
        # by age only: an erasure rewrites a committed version's files in place (new names first)
        listed = {f["file"] for f in bundle.bundle_files(manifest)} | {bundle.MANIFEST}
        dead_lock = {BUILD_LOCK} if writer_state(folder) == DEAD else set()  # killed after its manifest
        return [
            Orphan(e.uri, e.bytes, "temporary file" if is_tmp(rel) else "not in the version's manifest")
            for rel, e in inside.items()
            if rel not in listed and (e.mtime <= now - older_than_s or rel in dead_lock)
        ]
    if name == current:
        return []  # CURRENT names it: never touched, even without a manifest
    state = writer_state(folder)
    if state == ALIVE or (state != DEAD and newest(entries) > now - older_than_s):
        return []  # its build is alive, or may be
    why = f"index build that never published ({len(entries)} files)"
    return [Orphan(folder, sum(e.bytes for e in entries), why)]  # the folder, empty subfolders too


def _by_top(files: list[Entry]) -> dict[str, list[Entry]]:
    groups: dict[str, list[Entry]] = {}
    for e in files:
        groups.setdefault(e.rel.split("/", 1)[0], []).append(e)
    return groups


def _current(root: str) -> str | None:
    uri = storage.join(root, "CURRENT")
    return storage.read_text(uri).strip() if storage.exists(uri) else None


def clean_unpublished(out: str) -> None:
    """Before an index build or a rebuild's build: delete what killed builds left under ``out``.

    Callers hold the index root's sweep lock (``pipelines.core.locks.sweep_lock``), under which no
    other build, rebuild or erasure writes there, so whatever has no live writer is debris,
    whatever its age: a version folder that never got its manifest (it holds embeddings), files a
    committed version does not list, temporary files. A local folder whose writer still holds its
    lock file is left alone all the same."""
    if not storage.exists(out):
        return
    if storage.is_local(out):
        # CURRENT's temporary file is written under this lock
        with storage.folder_lock(storage.url_to_fs(out)[1]):
            found = index_orphans(out, 0, next_build=True)
    else:
        found = index_orphans(out, 0)
    delete(found)
