"""The index bundle on disk: version names, the manifest, CURRENT, and the integrity check.

A bundle is ``<index>/<version>/`` holding FAISS shards, metadata and float16 stores, plus
``manifest.json`` written last. The manifest lists every other file with its sha256 and carries a
checksum of its own content, so a flipped byte anywhere in the bundle, manifest included, is
caught before faiss or pyarrow reads anything. ``<index>/CURRENT`` names the version to open.

The checksum is unkeyed: whoever can write the bucket can reseal a manifest. So nothing read from a
manifest is trusted to steer a path or a size: the version and file names must match their
patterns (``check_names``), downloads land in a temporary folder inside the cache and are renamed
into place only once every sha256 matches (``download.local_copy``), every declared size is checked against
the file before faiss, numpy or pyarrow parses it (``check_declared``), and ``match_threshold``
must lie in (0, 1). Who built a bundle is established by its Ed25519 signature (``signing.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator

import numpy as np

from pipelines.core import storage
from pipelines.core.errors import FatalError
from pipelines.core.faults import checkpoint
from pipelines.core.names import BadName, check_name, is_name

from . import signing
from .errors import IntegrityError
from .faiss_check import FaissCheck

FORMAT = "faceaudit.index/1"
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
BUILD_DIR = "_build"  # per-build scratch inside the version folder (occurrence spills), removed at the end


MAX_CLOCK_SKEW_S = 120
VERSION_NAME = re.compile(r"(\d{8}T\d{6}Z)-[0-9a-f]{8}")
# Every file a bundle may list (erasures add ``.e<N>`` revisions); erase/bundles.py's delete_unlisted
# uses the same pattern.
BUNDLE_FILE = re.compile(
    r"^(shard-\d+(\.e\d+)?\.(faissindex|ivfdata)|metadata/part-\d+(\.e\d+)?\.parquet"
    r"|store/(ids|vectors)-\d+(\.e\d+)?\.npy|lookup/hashes-\d+(\.e\d+)?\.parquet"
    r"|copies/(part|hashes)-\d+(\.e\d+)?\.parquet)$"
)
FILE_KEYS = {  # shard entry key -> the file kind it must name
    "index": ".faissindex",
    "ivfdata": ".ivfdata",
    "metadata": ".parquet",
    "ids": ".npy",
    "vectors": ".npy",
    "hashes": ".parquet",  # the range look-up's hash table (indexing/lookup.py)
}
SHA256 = re.compile(r"[0-9a-f]{64}")
COPIES_KEYS = ("table", "hashes")  # the manifest's ``copies`` entry: the files it lists


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


def seal(body: dict, key: signing.Ed25519PrivateKey | None = None) -> bytes:
    """The manifest's bytes: signed with ``key`` (default: ``signing.active_key()``, the command's
    ``--signing-key`` or ``$FACEAUDIT_SIGNING_KEY``) when there is one, then a checksum over
    everything else in it. Without a key, a signature the body carries is kept only while it still
    verifies (an export that changes nothing stays signed); a stale one is dropped."""
    # as JSON will read it back, so the checksum and signature fit what a reader parses
    body = json.loads(json.dumps({k: v for k, v in body.items() if k != "checksum"}))
    key = key or signing.active_key()
    if key is not None:
        body["signature"] = signing.sign(body, key)
    elif "signature" in body and not signing.self_consistent(body):
        del body["signature"]
    sealed = {**body, "checksum": checksum(body)}
    return (json.dumps(sealed, indent=2, sort_keys=True) + "\n").encode()


def parse_manifest(raw: bytes) -> dict:
    """The manifest, or an IntegrityError naming manifest.json when it is altered or names a path,
    a size or a threshold no build writes (see ``check_names``, ``check_threshold``)."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
        claimed = manifest.pop("checksum")
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise IntegrityError(MANIFEST, f"unreadable ({type(exc).__name__})") from exc
    if checksum(manifest) != claimed:
        raise IntegrityError(MANIFEST, "its content does not match its checksum")
    if manifest.get("format") != FORMAT:
        raise IntegrityError(MANIFEST, f"format {manifest.get('format')!r}, expected {FORMAT!r}")
    check_names(manifest)
    if "match_threshold" in manifest:
        check_threshold(manifest)
    return manifest


def check_version(manifest: dict) -> str:
    """The manifest's version name, when it is a safe path component (DESIGN.md's names)."""
    try:
        return check_name(manifest.get("version"), "version")
    except BadName as exc:
        raise IntegrityError(MANIFEST, f"it names an unsafe version: {exc}") from exc


def check_names(manifest: dict) -> None:
    """Refuse a manifest whose version or listed files could name a path outside the bundle, and
    entries whose sizes or digests are not what a build writes. Signed or not, these never steer
    a path: the version must pass ``check_name``, each file ``BUNDLE_FILE`` (by its kind)."""
    if "version" in manifest:
        check_version(manifest)
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise IntegrityError(MANIFEST, "its shards are not a list of entries")
    for shard in shards:
        for key, kind in FILE_KEYS.items():
            entry = shard.get(key)
            if entry is None or entry == {}:
                continue
            check_entry(entry, kind)
        if "ntotal" in shard and not _count(shard["ntotal"]):
            raise IntegrityError(MANIFEST, f"a shard declares ntotal {shard['ntotal']!r}")
    copies = manifest.get("copies")
    if copies is not None:
        if not isinstance(copies, dict):
            raise IntegrityError(MANIFEST, "its copies entry is not an entry")
        for key in COPIES_KEYS:
            check_entry(copies.get(key), ".parquet")


def check_entry(entry: object, kind: str = "") -> str:
    """An entry's file name, when the entry is {file, sha256, bytes} of a bundle file of ``kind``."""
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not BUNDLE_FILE.fullmatch(name) or not name.endswith(kind):
        shown = repr(name)[:80]
        raise IntegrityError(MANIFEST, f"it lists file {shown}, which is not a bundle file name")
    assert isinstance(entry, dict)
    if not _count(entry.get("bytes")):
        raise IntegrityError(name, f"the manifest declares {entry.get('bytes')!r} bytes")
    if not isinstance(entry.get("sha256"), str) or not SHA256.fullmatch(entry["sha256"]):
        raise IntegrityError(name, "the manifest's sha256 is not 64 hex digits")
    return name


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def check_threshold(manifest: dict) -> float:
    """The manifest's match_threshold, which must lie strictly between 0 and 1: at 0 (or 1 and
    above, for a negated score) every face would match, and ``erase --photo`` would erase the
    whole index."""
    value = manifest.get("match_threshold")
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value < 1:
        raise IntegrityError(MANIFEST, f"match_threshold {value!r} is not between 0 and 1")
    return float(value)


def bundle_files(manifest: dict) -> Iterator[dict]:
    """Every file entry ({file, sha256, bytes}) the manifest lists, in a fixed order."""
    for shard in manifest["shards"]:
        for key in ("index", "ivfdata", "metadata", "ids", "vectors", "hashes"):
            if shard.get(key):
                yield shard[key]
    for key in COPIES_KEYS:  # the copies table and its range hashes (indexing/copies.py)
        if manifest.get("copies"):
            yield manifest["copies"][key]


def file_entry(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    return {"file": name, "sha256": storage.sha256_file(path), "bytes": os.path.getsize(path)}


def verify(folder: str, manifest: dict) -> None:
    """Check each listed file in the local ``folder``: its size and every size declared inside it
    (``check_declared``), then its sha256; name the first bad one."""
    check_declared(folder, manifest)
    for entry in bundle_files(manifest):
        if storage.sha256_file(inside_folder(folder, entry["file"])) != entry["sha256"]:
            raise IntegrityError(entry["file"], "sha256 does not match the manifest")


def verify_in_place(folder: str, manifest: dict) -> None:
    """``verify`` for a version folder wherever it lies: a local one fully, a remote one by each
    file's size and sha256 (read where it is, nothing is parsed)."""
    if storage.is_local(folder):
        verify(storage.url_to_fs(folder)[1], manifest)
        return
    for entry in bundle_files(manifest):
        target = storage.join(folder, check_entry(entry))
        if not storage.exists(target):
            raise IntegrityError(entry["file"], "missing")
        size = storage.size(target)
        if size != entry["bytes"]:
            raise IntegrityError(entry["file"], f"{size} bytes, the manifest says {entry['bytes']}")
        if storage.sha256_file(target) != entry["sha256"]:
            raise IntegrityError(entry["file"], "sha256 does not match the manifest")


def check_sizes(folder: str, manifest: dict) -> None:
    """Each listed file exists in the local ``folder`` and has the size the manifest declares."""
    for entry in bundle_files(manifest):
        path = inside_folder(folder, entry["file"])
        if not os.path.isfile(path):
            raise IntegrityError(entry["file"], "missing")
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise IntegrityError(entry["file"], f"{size} bytes, the manifest says {entry['bytes']}")


def check_declared(folder: str, manifest: dict) -> None:
    """Every size a reader would act on, checked against the files before any of them is parsed:
    the manifest's per-file ``bytes`` against the real sizes, then every length, count and offset
    inside each FAISS file (and its .ivfdata) and each .npy header against the bytes there. A
    resealed shard that declares 2^31 codes is refused here, not by faiss after it has allocated
    gigabytes. Cheap: headers are read and the data is skipped."""
    check_sizes(folder, manifest)
    dim = manifest.get("dim")
    dim = dim if _count(dim) else None
    for shard in manifest["shards"]:
        ntotal = shard.get("ntotal") if _count(shard.get("ntotal")) else None
        if shard.get("index"):
            ivfdata = shard.get("ivfdata") or None
            FaissCheck(
                inside_folder(folder, shard["index"]["file"]),
                shard["index"]["file"],
                dim,
                ntotal,
                inside_folder(folder, ivfdata["file"]) if ivfdata else None,
            ).run()
        if shard.get("ids"):
            check_npy(folder, shard["ids"]["file"], np.dtype("<i8"), (ntotal,))
        if shard.get("vectors"):
            check_npy(folder, shard["vectors"]["file"], np.dtype("<f2"), (ntotal, dim))


def check_npy(folder: str, name: str, dtype: np.dtype, shape: tuple) -> None:
    """A .npy file holds one C-ordered array of ``dtype`` whose declared shape (``None`` in
    ``shape``: any) exactly fills the file after its header."""
    path = inside_folder(folder, name)
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            got_shape, fortran, got_dtype = read(f)
            header = f.tell()
    except (ValueError, OSError, SyntaxError) as exc:
        raise IntegrityError(name, f"not a .npy file faceaudit writes ({exc})") from exc
    if got_dtype != dtype or fortran or len(got_shape) != len(shape):
        raise IntegrityError(name, f"holds {got_dtype} {got_shape}, expected {dtype} of {len(shape)} dims")
    if any(want is not None and got != want for got, want in zip(got_shape, shape, strict=True)):
        raise IntegrityError(name, f"shape {got_shape}, the manifest says {shape}")
    need = header + math.prod(got_shape) * dtype.itemsize
    if need != os.path.getsize(path):
        raise IntegrityError(name, f"declares {need} bytes, the file has {os.path.getsize(path)}")


def resolve(uri: str) -> tuple[str, str]:
    """(version folder URI, version) for an index root (via CURRENT) or a version folder."""
    uri = uri.rstrip("/")
    if storage.exists(storage.join(uri, MANIFEST)):
        return uri, uri.rsplit("/", 1)[-1]
    current = storage.join(uri, CURRENT)
    if not storage.exists(current):
        raise IntegrityError(CURRENT, f"no {CURRENT} and no {MANIFEST} under {uri}")
    version = storage.read_bytes(current)[:1024].decode("utf-8", "replace").strip()
    if not is_name(version):
        raise IntegrityError(CURRENT, f"names {version[:80]!r}, which is not a version name")
    if not storage.exists(storage.join(uri, version, MANIFEST)):
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


def inside_folder(base: str, *parts: str) -> str:
    """``base/parts...`` when its real path lies inside the real ``base``; IntegrityError otherwise."""
    root = os.path.realpath(base)
    path = os.path.realpath(os.path.join(root, *parts))
    if path == root or not path.startswith(root.rstrip(os.sep) + os.sep):
        raise IntegrityError("/".join(parts), f"resolves outside {base}; refusing to touch it")
    return path
