"""One storage layer for local paths and ``gs://`` URIs (after datatrove's io.py).

Stages and engines call these functions with URIs and never ask which file system is behind
them. Every committed object is written whole to a temporary name first and then committed in one
step, so a reader never sees half a file. ``gs://`` goes to ``gcs.py``: there the commit is one
conditional upload (see docs/gcs.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import AlreadyExists, Conflict  # raised by the writers below (storage.AlreadyExists)
from .faults import checkpoint

TMP_MARK = ".tmp-"
# Local files and folders faceaudit creates hold face embeddings, keys and locks: owner only
# (docs/security.md). Every local create below goes through make_dirs and create_private.
FILE_MODE = 0o600
DIR_MODE = 0o700
GCS_SCHEMES = ("gs://", "gcs://")
ABSENT = "absent"  # the version token of a local object that does not exist


def make_dirs(path: str) -> None:
    """Create the local folder ``path`` and each missing folder above it, 0700 (the umask may take
    more away, never add). Folders that already exist are left as they are."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, DIR_MODE)


def create_private(path: str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL) -> int:
    """Open (by default: create, failing if it exists) the local file ``path``, 0600, and return
    its descriptor; not inherited by programs this process starts."""
    return os.open(path, flags | os.O_CLOEXEC, FILE_MODE)


def make_private(path: str) -> None:
    """Owner-only mode for a local file that a library created with the default mode (faiss,
    numpy and pyarrow writers take no mode), before it is moved into place."""
    os.chmod(path, FILE_MODE)


def restrict(uri: str) -> None:
    """Take group and other access away from an existing local file (one created before files
    were made 0600); a no-op on gs://, and when this process may not change it."""
    if is_gcs(uri) or not is_local(uri):
        return
    path = url_to_fs(uri)[1]
    with contextlib.suppress(OSError):
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, FILE_MODE)


def is_gcs(uri: str) -> bool:
    return uri.startswith(GCS_SCHEMES)


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if is_gcs(uri):
        from . import gcs  # imported here: gs:// needs the optional "gcs" extra

        fs = gcs.filesystem()
        return fs, fs._strip_protocol(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def is_local(uri: str) -> bool:
    return isinstance(url_to_fs(uri)[0], LocalFileSystem)


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = url_to_fs(uri)
    return fs.cat_file(path)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under ``uri``; empty when it does not exist."""
    fs, path = url_to_fs(uri)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def size(uri: str) -> int:
    fs, path = url_to_fs(uri)
    return int(fs.size(path))


def sha256_file(uri: str, chunk: int = 1 << 22) -> str:
    fs, path = url_to_fs(uri)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(uri: str, path: str, chunk: int = 1 << 22) -> None:
    """Copy ``uri`` to the local ``path`` in chunks (bounded memory); ``path`` appears only whole."""
    fs, remote = url_to_fs(uri)
    folder = os.path.dirname(path) or "."
    make_dirs(folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TMP_MARK}{uuid.uuid4().hex}")
    try:
        with fs.open(remote, "rb") as src, os.fdopen(create_private(tmp), "wb") as dst:
            while block := src.read(chunk):
                dst.write(block)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def move_in(path: str, uri: str) -> None:
    """Move the local file ``path`` to ``uri`` whole: a rename locally (a move across file
    systems), one upload on GCS (an object appears only complete)."""
    if is_local(uri):
        target = url_to_fs(uri)[1]
        make_dirs(os.path.dirname(target) or ".")
        make_private(path)  # written by a library with the default mode
        shutil.move(path, target)
        return
    fs, remote = url_to_fs(uri)
    fs.put_file(path, remote)


def remove(uri: str) -> None:
    fs, path = url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def purge_history(uri: str) -> int:
    """Delete the noncurrent versions a versioned bucket keeps of ``uri`` (a replaced or removed
    object); the live version, if any, stays. Local files keep no history: 0."""
    if not is_gcs(uri):
        return 0
    from . import gcs

    return gcs.purge_noncurrent(uri)


def write_atomic(uri: str, data: bytes, create_only: bool = False) -> None:
    """Write ``data`` to ``uri`` so that readers see either nothing or all of it.

    Locally: write a temporary file in the same folder, fsync, then rename (or hard-link for a
    create-only write, which fails if ``uri`` exists). On GCS: one upload conditioned on the
    object being absent, or (not ``create_only``) on the generation found there, so concurrent
    writers raise Conflict instead of clobbering. Elsewhere: one whole-object upload.
    """
    if is_gcs(uri):
        from . import gcs

        gcs.write_atomic(uri, data, create_only)
        return
    fs, path = url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        _write_local(path, data, create_only)
        return
    if create_only and fs.exists(path):
        raise AlreadyExists(uri)
    fs.pipe_file(path, data)


def _write_local(path: str, data: bytes, create_only: bool) -> None:
    folder = os.path.dirname(path) or "."
    make_dirs(folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TMP_MARK}{uuid.uuid4().hex}")
    with os.fdopen(create_private(tmp), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    checkpoint("storage.before_rename")
    try:
        if create_only:
            try:
                os.link(tmp, path)
            except FileExistsError as exc:
                raise AlreadyExists(path) from exc
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_versioned(uri: str) -> tuple[bytes | None, str]:
    """(content or None when absent, version token) for a later ``write_if_unchanged``."""
    if is_gcs(uri):
        from . import gcs

        return gcs.read_versioned(uri)
    path = _local_path(uri)
    data = _read_or_none(path)
    return data, _local_token(data)


def write_if_unchanged(uri: str, data: bytes, token: str) -> str:
    """Replace (or create) ``uri`` only if it is still the version ``token`` names; else Conflict.

    Returns the new token. On GCS the token is the generation (``ifGenerationMatch``); locally it
    is the content's sha256, compared and replaced under an exclusive lock on the folder, so it
    holds against other ``write_if_unchanged`` callers on the same host.
    """
    if is_gcs(uri):
        from . import gcs

        return gcs.write_if_unchanged(uri, data, token)
    path = _local_path(uri)
    folder = os.path.dirname(path) or "."
    make_dirs(folder)
    with folder_lock(folder):
        if _local_token(_read_or_none(path)) != token:
            raise Conflict(f"{uri} changed since it was read")
        _write_local(path, data, create_only=False)
    return _local_token(data)


def _local_path(uri: str) -> str:
    fs, path = url_to_fs(uri)
    if not isinstance(fs, LocalFileSystem):
        raise ValueError(f"compare-and-swap is implemented for local paths and gs:// only, not {uri}")
    return path


def _read_or_none(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _local_token(data: bytes | None) -> str:
    return ABSENT if data is None else hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def folder_lock(folder: str) -> Iterator[None]:
    """flock on the folder itself: no lock file to leave behind, released if the process dies."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def remove_tmp_files(uri: str) -> int:
    """Delete temporary files left by crashed writers under ``uri``; returns how many."""
    fs, path = url_to_fs(uri)
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.find(path) if TMP_MARK in os.path.basename(p)]
    for p in stale:
        fs.rm(p)
    return len(stale)


def walk_files(uri: str) -> Iterator[str]:
    """Every file under ``uri``, as URIs with the same scheme, in sorted order."""
    fs, path = url_to_fs(uri)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    for p in sorted(fs.find(path)):
        yield p if protocol in ("file", "local") else f"{protocol}://{p}"
