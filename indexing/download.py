"""Remote bundles into the local download cache: every path checked to stay inside the cache, every
file fetched (at most its declared bytes) into a temporary folder that is renamed into place only
once every size and sha256 matches the manifest."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from pipelines.core import storage

from .bundle import bundle_files, check_entry, check_version, inside_folder, verify
from .errors import IntegrityError

PARTIAL = ".partial-"  # a download in progress inside the cache folder
PARTIAL_STALE_S = 24 * 3600


def local_copy(folder: str, manifest: dict, cache_dir: str) -> str:
    """A local folder holding the bundle's files: ``folder`` itself, or a verified download cache.

    A remote bundle is copied to ``<cache_dir>/<version>/``, the version name and every file name
    checked first and every path resolved inside the cache (symbolic links included). Each file is
    fetched (at most its declared bytes) into a temporary folder in the cache, which is renamed into
    place only once every size and sha256 matches the manifest; a copy already in place is used
    only after the same check."""
    if storage.is_local(folder):
        return storage.url_to_fs(folder)[1]
    version = check_version(manifest)
    entries = list(bundle_files(manifest))
    for entry in entries:
        check_entry(entry)
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    cache = os.path.realpath(cache_dir)
    target = inside_folder(cache, version)
    if os.path.isdir(target):
        try:
            verify(target, manifest)
            return target
        except IntegrityError:
            pass  # an older or damaged copy: fetched again below, its good files reused
    _sweep_partials(cache)
    staging = tempfile.mkdtemp(prefix=f"{PARTIAL}{version}-", dir=cache)
    try:
        for entry in entries:
            path = inside_folder(staging, entry["file"])
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            if not _reuse(inside_folder(cache, version, entry["file"]), path, entry):
                _fetch(storage.join(folder, entry["file"]), path, entry)
        verify(staging, manifest)
        _move_into_place(staging, target, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _reuse(old: str, path: str, entry: dict) -> bool:
    """Hard-link a file of an earlier copy into the new one when its size and sha256 still match."""
    try:
        if not os.path.isfile(old) or os.path.getsize(old) != entry["bytes"]:
            return False
        if storage.sha256_file(old) != entry["sha256"]:
            return False
        os.link(old, path)
        return True
    except OSError:
        return False


def _fetch(uri: str, path: str, entry: dict, chunk: int = 1 << 22) -> None:
    """Download ``uri`` to ``path``, refusing it once it is longer than the manifest declares."""
    size = storage.size(uri)
    if size != entry["bytes"]:
        raise IntegrityError(entry["file"], f"{size} bytes, the manifest says {entry['bytes']}")
    fs, remote = storage.url_to_fs(uri)
    left = entry["bytes"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with fs.open(remote, "rb") as src, os.fdopen(fd, "wb") as dst:
        while block := src.read(min(chunk, left + 1)):
            left -= len(block)
            if left < 0:
                raise IntegrityError(
                    entry["file"], f"longer than the {entry['bytes']} bytes the manifest says"
                )
            dst.write(block)


def _move_into_place(staging: str, target: str, manifest: dict) -> None:
    """Rename the verified ``staging`` folder to ``target``. A good copy another process put there
    meanwhile is kept (it may be open already); a bad or older one is moved aside and removed."""
    old = None
    if os.path.isdir(target):
        try:
            verify(target, manifest)
            return
        except IntegrityError:
            old = tempfile.mkdtemp(prefix=f"{PARTIAL}old-", dir=os.path.dirname(target))
            os.rename(target, os.path.join(old, "copy"))
    try:
        os.rename(staging, target)
    except OSError:
        verify(target, manifest)  # a concurrent open_index finished first
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _sweep_partials(cache: str) -> None:
    """Remove temporary download folders a killed process left in the cache (a day old)."""
    now = time.time()
    for name in os.listdir(cache):
        path = os.path.join(cache, name)
        if name.startswith(PARTIAL) and not os.path.islink(path):
            try:
                if now - os.path.getmtime(path) > PARTIAL_STALE_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                continue
