"""The index bundle on disk: version names, the manifest, CURRENT, and the integrity check.

A bundle is ``<index>/<version>/`` holding FAISS shards, metadata and float16 stores, plus
``manifest.json`` written last. The manifest lists every other file with its sha256 and carries a
checksum of its own content, so a flipped byte anywhere in the bundle, manifest included, is
caught before faiss or pyarrow reads anything. ``<index>/CURRENT`` names the version to open.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator

from pipelines.core import storage
from pipelines.core.errors import FatalError
from pipelines.core.faults import checkpoint

from .errors import IntegrityError

FORMAT = "faceaudit.index/1"
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
BUILD_DIR = "_build"  # per-build scratch inside the version folder (occurrence spills), removed at the end


MAX_CLOCK_SKEW_S = 120
VERSION_NAME = re.compile(r"(\d{8}T\d{6}Z)-[0-9a-f]{8}")


def new_version(input_digest: str) -> str:
    """Sortable and unique enough: UTC time to the second, then a digest of the inputs."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + input_digest[:8]


def fresh_version(out: str, input_digest: str) -> str:
    """A version name that sorts after every version already under ``out``.

    Names are to the second, and CURRENT's compare-and-swap takes the larger name as the newer
    one; two builds in one second would otherwise be ordered by their input digests. So a build
    that starts in a second some earlier version (or a killed attempt) took waits for the next.
    """
    stamps = [m.group(1) for m in map(VERSION_NAME.fullmatch, storage.listdir(out)) if m]
    latest = max(stamps, default="")
    ahead = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() + MAX_CLOCK_SKEW_S))
    if latest > ahead:
        raise FatalError(
            f"{out} holds version {latest}, more than {MAX_CLOCK_SKEW_S} s ahead of this "
            "machine's clock; fix the clock (or that name) before building"
        )
    while True:
        version = new_version(input_digest)
        if version.split("-")[0] > latest:
            return version
        time.sleep(1.0 - time.time() % 1.0 + 0.01)


def checksum(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal(body: dict) -> bytes:
    """The manifest's bytes, with a checksum over everything else in it."""
    sealed = {**body, "checksum": checksum(body)}
    return (json.dumps(sealed, indent=2, sort_keys=True) + "\n").encode()


def parse_manifest(raw: bytes) -> dict:
    """The manifest, or an IntegrityError naming manifest.json when it is altered."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
        claimed = manifest.pop("checksum")
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise IntegrityError(MANIFEST, f"unreadable ({type(exc).__name__})") from exc
    if checksum(manifest) != claimed:
        raise IntegrityError(MANIFEST, "its content does not match its checksum")
    if manifest.get("format") != FORMAT:
        raise IntegrityError(MANIFEST, f"format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def bundle_files(manifest: dict) -> Iterator[dict]:
    """Every file entry ({file, sha256, bytes}) the manifest lists, in a fixed order."""
    for shard in manifest["shards"]:
        for key in ("index", "ivfdata", "metadata", "ids", "vectors"):
            if shard.get(key):
                yield shard[key]


def file_entry(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    return {"file": name, "sha256": storage.sha256_file(path), "bytes": os.path.getsize(path)}


def verify(folder: str, manifest: dict) -> None:
    """Check each listed file's size and sha256 in the local ``folder``; name the first bad one."""
    for entry in bundle_files(manifest):
        path = os.path.join(folder, entry["file"])
        if not os.path.exists(path):
            raise IntegrityError(entry["file"], "missing")
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise IntegrityError(entry["file"], f"{size} bytes, the manifest says {entry['bytes']}")
        if storage.sha256_file(path) != entry["sha256"]:
            raise IntegrityError(entry["file"], "sha256 does not match the manifest")


def resolve(uri: str) -> tuple[str, str]:
    """(version folder URI, version) for an index root (via CURRENT) or a version folder."""
    uri = uri.rstrip("/")
    if storage.exists(storage.join(uri, MANIFEST)):
        return uri, uri.rsplit("/", 1)[-1]
    current = storage.join(uri, CURRENT)
    if not storage.exists(current):
        raise IntegrityError(CURRENT, f"no {CURRENT} and no {MANIFEST} under {uri}")
    version = storage.read_text(current).strip()
    if not version or "/" in version or not storage.exists(storage.join(uri, version, MANIFEST)):
        raise IntegrityError(CURRENT, f"names version {version!r}, which has no committed manifest")
    return storage.join(uri, version), version


def root_of(folder: str) -> str:
    """The index root that holds the version ``folder`` (where CURRENT and ``_erasure/`` live)."""
    head, sep, _ = folder.rstrip("/").rpartition("/")
    return head if sep else "."


def publish(staging: str, out: str, version: str, body: dict) -> str:
    """Upload the staged files (when ``out`` is remote), write the manifest last, move CURRENT."""
    folder = storage.join(out, version)
    if not storage.is_local(out):
        fs, path = storage.url_to_fs(folder)
        for entry in bundle_files(body):
            fs.put_file(os.path.join(staging, entry["file"]), f"{path}/{entry['file']}")
    storage.write_atomic(storage.join(folder, MANIFEST), seal(body), create_only=True)
    move_current(out, version)
    return folder


def move_current(out: str, version: str) -> bool:
    """Point CURRENT at ``version`` unless a newer version was published meanwhile.

    A compare-and-swap (a generation precondition on GCS), so two builds finishing together can
    never move CURRENT back to the older one. Version names sort by creation time.
    """
    uri = storage.join(out, CURRENT)
    while True:
        data, token = storage.read_versioned(uri)
        if data is not None and data.decode().strip() >= version:
            return False
        checkpoint("index.move_current")
        try:
            storage.write_if_unchanged(uri, (version + "\n").encode(), token)
            return True
        except storage.Conflict:
            continue  # another build moved it between our read and write: look again


def local_copy(folder: str, manifest: dict, cache_dir: str) -> str:
    """A local folder holding the bundle's files: ``folder`` itself, or a verified download cache."""
    if storage.is_local(folder):
        return storage.url_to_fs(folder)[1]
    target = os.path.join(cache_dir, manifest["version"])
    for entry in bundle_files(manifest):
        path = os.path.join(target, entry["file"])
        if os.path.exists(path) and os.path.getsize(path) == entry["bytes"]:
            continue  # verify() below re-checks its sha256 anyway
        storage.download(storage.join(folder, entry["file"]), path)
    return target
