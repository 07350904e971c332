"""Which URIs a data set may read: its own folder or bucket prefix, http(s), and roots the operator
allowed. Everything a scraped URI list names is hostile until this says otherwise.

A URI list may name:

* http(s) URLs (``sources_http`` then refuses internal addresses);
* paths relative to the list's own folder, which must stay inside it (no ``..`` escape);
* URIs under the data set's own folder, ``gs://`` bucket and prefix (the list's folder);
* URIs under roots the job lists explicitly (``allowed_roots``).

Everything else is refused, with one reason whatever the target is and whether it exists, so the
error rows cannot be used to probe the worker's files: ``file://`` and absolute paths, ``..``
escapes, other fsspec schemes (``webhdfs://``, ``ftp://``, ...) and other buckets. A local file
is checked again by its real path when it is read, so a symlink cannot lead out either.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
from collections.abc import Iterable

from .errors import RecordError

SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

OUTSIDE = "outside the data set: not an http(s) URL, nor under its folder, its list's folder or allowed_roots"


def is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def _has_scheme(uri: str) -> bool:
    return SCHEME.match(uri) is not None


def normalize(uri: str) -> str:
    """``proto://bucket/a/b`` or an absolute local path, with ``.`` and ``..`` folded; ``file://``
    becomes a local path. A relative local path is made absolute against the working folder."""
    if uri.lower().startswith("file://"):
        uri = uri[len("file://") :]
    if _has_scheme(uri):
        proto, path = uri.split("://", 1)
        folded = posixpath.normpath("/" + path).lstrip("/")
        return f"{proto.lower()}://{folded}"
    return os.path.normpath(os.path.abspath(uri))


def under(uri: str, root: str) -> bool:
    """``uri`` is ``root`` or lies below it (both normalized; a lexical test)."""
    uri, root = normalize(uri), normalize(root).rstrip("/")
    return uri == root or uri.startswith(root + "/")


def allowed(uri: str, roots: Iterable[str]) -> bool:
    """May a data set read ``uri``? http(s) always (internal addresses are refused when fetched);
    anything else only under one of ``roots``. Lexical: nothing is opened or resolved."""
    if "://" in uri and not _has_scheme(uri):
        return False  # "://" that is not a scheme: storage would take it for one all the same
    return is_http(uri) or any(under(uri, root) for root in roots)


def check_real_path(path: str, roots: Iterable[str]) -> str:
    """The real path of a local ``path`` (symlinks resolved) if it stays under a local root."""
    real = os.path.realpath(path)
    if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in _real_roots(tuple(roots))):
        raise RecordError("read", OUTSIDE)
    return real


@functools.lru_cache(maxsize=256)
def _real_roots(roots: tuple[str, ...]) -> tuple[str, ...]:
    """The local roots' real paths, resolved once per unit's roots rather than once per file read."""
    return tuple(os.path.realpath(r) for r in map(normalize, roots) if "://" not in r)


def resolve_entry(entry: str, base: str) -> str:
    """A list entry as a URI: relative entries against the list's folder ``base``, folded."""
    if "://" in entry or entry.startswith("/"):
        return entry
    if "://" in base:
        protocol, path = base.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(path, entry))}"
    return os.path.normpath(os.path.join(base, entry))
