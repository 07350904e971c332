"""One storage layer for local paths and ``gs://`` URIs (after datatrove's io.py).

Stages and engines call these functions with URIs and never ask which file system is behind
them. Every committed object is written whole to a temporary name first and then committed in one
step, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"


class AlreadyExists(FileExistsError):
    """A create-only write found the object already there."""


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
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


def remove(uri: str) -> None:
    fs, path = url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_atomic(uri: str, data: bytes, create_only: bool = False) -> None:
    """Write ``data`` to ``uri`` so that readers see either nothing or all of it.

    Locally: write a temporary file in the same folder, fsync, then rename (or hard-link for a
    create-only write, which fails if ``uri`` exists). Elsewhere: one whole-object upload.
    """
    fs, path = url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        _write_local(path, data, create_only)
        return
    if create_only and fs.exists(path):
        raise AlreadyExists(uri)
    fs.pipe_file(path, data)


def _write_local(path: str, data: bytes, create_only: bool) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TMP_MARK}{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
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
