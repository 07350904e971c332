"""Erasure on request: find a person's faces, log them (hashes only), then remove them everywhere.

Order, which makes an erasure crash-safe and idempotent (docs/erasure.md):

1. ``ErasureLog.append``: one create-only entry of salted hashes. From here on no search, index
   build, ingest or export returns or writes those faces, whatever is still on disk.
2. ``sweep``: everything the log names is removed physically, each file rewritten whole and
   committed, manifests last: the faces shards of every run the index's versions were built from
   (then the run manifest), every index version (new file names, then the manifest), exports the
   operator names, and download caches. Old objects and, on GCS, their noncurrent versions are
   deleted. A sweep removes whatever the log names and is still there, so running it again after
   a crash finishes the job, and running it when nothing is left changes nothing.

Concurrency: sweeps of one index root run one at a time, under a lock object beside the rebuild's
(``_erase.lock``); a second eraser waits for it and then sweeps itself, since the running sweep may
have read the log before the second entry. An index build or rebuild re-reads the log after its
manifest is committed and before it moves CURRENT (``catch_up``) and sweeps when an entry came in
after it read the log: an eraser lists the versions after logging and a build reads the log after
its manifest, so one of the two always sees the other and a new version cannot bring a face back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import erasure, storage
from pipelines.core.errors import FatalError
from pipelines.core.faults import checkpoint
from pipelines.core.writer import RUN_MANIFEST, parquet_bytes
from pipelines.rebuild.lock import LockHeld, RebuildLock

from . import bundle
from .search import Index, read_faiss

SWEEP_LOCK = "_erase.lock"  # under the index root while a sweep runs
SWEEP_WAIT_S = 900.0  # how long an eraser or a build waits for another sweep to finish
PENDING = "_erasure_pending.json"  # in a run folder: sha256s of shards an interrupted erase rewrote
METADATA_ROW_GROUP = 4096
REVISION = re.compile(r"\.e\d+(?=\.[^./]+$)")


@dataclass(slots=True)
class Found:
    """An indexed face to erase, as it is listed for confirmation (never its embedding)."""

    face_id: int
    image_sha256: str
    face_index: int
    bbox: tuple[float, ...]
    occurrences: list[dict]
    score: float | None = None  # similarity to the photo it was found with


@dataclass(slots=True)
class Report:
    """What a sweep did."""

    entry: str | None = None
    run_faces_removed: int = 0
    run_shards_rewritten: int = 0
    runs_updated: list[str] = field(default_factory=list)
    bundle_faces_removed: dict[str, int] = field(default_factory=dict)  # version folder -> faces
    files_deleted: int = 0
    noncurrent_deleted: int = 0
    caches_removed: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- finding faces


def find_by_photos(index: Index, photos: Iterable[str], threshold: float | None = None) -> list[Found]:
    """Every indexed face at or above the model's calibrated threshold of any face in the photos."""
    from .cli import search_photos

    found: dict[int, Found] = {}
    k = min(max(index.ntotal, 1), 64)
    for photo in photos:
        while True:  # widen k until the matches stop filling it
            report = search_photos(index, [photo], k, threshold, None)
            faces = report["photos"][0]["faces"]
            if not any(f["more_may_exist"] for f in faces) or k >= index.ntotal:
                break
            k = min(k * 4, index.ntotal)
        for face in faces:
            for m in face["matches"]:
                best = found.get(m["face_id"])
                if best is None or (best.score or 0) < m["score"]:
                    found[m["face_id"]] = Found(
                        m["face_id"],
                        m["image_sha256"],
                        m["face_index"],
                        tuple(m["bbox"]),
                        m["occurrences"],
                        m["score"],
                    )
    return sorted(found.values(), key=lambda f: -(f.score or 0))


def find_by_ids(
    index: Index,
    face_ids: Iterable[int] = (),
    image_shas: Iterable[str] = (),
    source_uris: Iterable[str] = (),
) -> tuple[list[Found], list[str]]:
    """Indexed faces with one of the ids, or in one of the images; and the images to erase whole."""
    ids = pa.array(sorted({int(i) for i in face_ids}), pa.int64())
    shas = {s.lower() for s in image_shas}
    uris = set(source_uris)
    found: list[Found] = []
    for shard in index.shards:
        columns = ["face_id", "image_sha256", "face_index", "bbox", "occurrences"]
        meta = shard.metadata.file.read(columns=columns)
        hit = pc.is_in(meta.column("face_id"), value_set=ids)
        if shas:
            hit = pc.or_(hit, pc.is_in(meta.column("image_sha256"), value_set=pa.array(sorted(shas))))
        if uris:
            occurrences = meta.column("occurrences").to_pylist()
            in_uri = [any(o["source_uri"] in uris for o in occ) for occ in occurrences]
            hit = pc.or_(hit, pa.array(in_uri))
        for row in meta.filter(hit).to_pylist():
            found.append(
                Found(
                    row["face_id"],
                    row["image_sha256"],
                    row["face_index"],
                    tuple(row["bbox"]),
                    row["occurrences"],
                )
            )
    whole = sorted(shas | {f.image_sha256 for f in found if uris and _in_uris(f, uris)})
    return sorted(found, key=lambda f: f.face_id), whole


def _in_uris(face: Found, uris: set[str]) -> bool:
    return any(o["source_uri"] in uris for o in face.occurrences)


# ---------------------------------------------------------------- erase = log, then sweep


def erase(
    index_uri: str,
    found: list[Found],
    extra_face_ids: Iterable[int] = (),
    whole_images: Iterable[str] = (),
    log_uri: str | None = None,
    exports: Iterable[str] = (),
    cache_dirs: Iterable[str] = (),
) -> Report:
    """Log the faces (the intent: from now on nothing returns them), then remove them everywhere."""
    log = erasure.ErasureLog(log_uri or erasure.default_log(index_root(index_uri)))
    entry = log_faces(log, found, extra_face_ids, whole_images)
    checkpoint("erase.logged")
    with sweep_lock(index_root(index_uri)):
        report = sweep(index_uri, log, exports, cache_dirs)
    report.entry = entry
    return report


def log_faces(
    log: erasure.ErasureLog,
    found: list[Found],
    extra_face_ids: Iterable[int] = (),
    whole_images: Iterable[str] = (),
) -> str | None:
    """Append one entry for the faces (and whole images); returns its name, None when empty."""
    face_ids = sorted({f.face_id for f in found} | {int(i) for i in extra_face_ids})
    whole = sorted(set(whole_images))
    if not (face_ids or whole):
        return None
    return log.append(face_ids, sorted({f.image_sha256 for f in found} | set(whole)), whole)


@contextlib.contextmanager
def sweep_lock(root: str, holder: str = "an erasure sweep", wait_s: float = SWEEP_WAIT_S) -> Iterator[None]:
    """Hold the index root's sweep lock for the block, waiting up to ``wait_s`` for its holder.

    Erasure sweeps take it, and so do index builds and rebuilds from their scan of the runs to
    the move of CURRENT: a sweep rewrites run shards that a build reads by row position."""
    lock = RebuildLock(root, ttl_s=600, name=SWEEP_LOCK, holder=holder)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.acquire()
            break
        except LockHeld as held:
            if time.monotonic() >= deadline:
                raise FatalError(f"{held}; waited {wait_s:g} s, try again later") from None
            time.sleep(1.0)
    try:
        yield
    finally:
        lock.release()


def catch_up(root: str, honoured: Iterable[str], log_uri: str, manifest: dict) -> bool:
    """For a build holding the sweep lock, its manifest committed and CURRENT not yet moved: sweep
    the index root (the new version included) when the erasure log has entries the build did not
    read, or its runs hold faces the log names (``counts.erased``: an ingest that read the log
    before an erasure, a run restored from a backup). True if it swept."""
    log = erasure.ErasureLog(log_uri)
    if set(log.entry_names()) <= set(honoured) and not manifest.get("counts", {}).get("erased"):
        return False
    sweep(root, log)
    return True


def index_root(uri: str) -> str:
    uri = uri.rstrip("/")
    return bundle.root_of(uri) if storage.exists(storage.join(uri, bundle.MANIFEST)) else uri


def version_folders(uri: str) -> list[str]:
    """A version folder itself, or every committed version under an index (or export) root."""
    uri = uri.rstrip("/")
    if storage.exists(storage.join(uri, bundle.MANIFEST)):
        return [uri]
    return [
        storage.join(uri, name)
        for name in storage.listdir(uri)
        if not name.startswith(("_", ".")) and storage.exists(storage.join(uri, name, bundle.MANIFEST))
    ]


def sweep(
    index_uri: str, log: erasure.ErasureLog, exports: Iterable[str] = (), cache_dirs: Iterable[str] = ()
) -> Report:
    """Remove every face the log names from the runs, every index version, the exports and caches."""
    report = Report()
    erased = log.load()
    if not erased:
        return report
    versions = version_folders(index_uri)
    run_uris: list[str] = []
    for folder in versions:
        manifest = read_bundle_manifest(folder)
        run_uris.extend(r["uri"] for r in manifest.get("runs", []) if r["uri"] not in run_uris)
    run_shas = {}
    for run in run_uris:
        if storage.exists(storage.join(run, RUN_MANIFEST)):
            run_shas[run] = sweep_run(run, erased, report)
    for folder in [*versions, *(v for e in exports for v in version_folders(e))]:
        sweep_bundle(folder, erased, run_shas, report)
    for cache in [*cache_dirs, default_cache()]:
        report.caches_removed.extend(purge_cache(cache, erased, versions))
    return report


def read_bundle_manifest(folder: str) -> dict:
    return bundle.parse_manifest(storage.read_bytes(storage.join(folder, bundle.MANIFEST)))


def default_cache() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "faceaudit", "index")


# ---------------------------------------------------------------- runs


def sweep_run(run: str, erased: erasure.ErasureSet, report: Report) -> str:
    """Rewrite the run's faces shards without erased faces, then its manifest; its new sha256."""
    manifest_uri = storage.join(run, RUN_MANIFEST)
    raw = storage.read_bytes(manifest_uri)
    manifest = json.loads(raw)
    pending_uri = storage.join(run, PENDING)
    pending = json.loads(storage.read_bytes(pending_uri)) if storage.exists(pending_uri) else {}
    removed, changed = 0, False
    for entry in manifest["shards"]:
        if entry["table"] != "faces":
            continue
        uri = storage.join(run, entry["file"])
        data = storage.read_bytes(uri)
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry["sha256"] and pending.get(entry["file"]) != actual:
            raise FatalError(f"{uri}: sha256 does not match its run manifest; erase leaves the run untouched")
        table = pq.read_table(pa.BufferReader(data))
        gone = erased.mask(
            table.column("face_id").to_numpy(),
            table.column("image_sha256").to_pylist() if erased.whole_images else None,
        )
        if gone.any():
            kept = table.filter(pa.array(~gone))
            new = parquet_bytes(kept)
            pending[entry["file"]] = hashlib.sha256(new).hexdigest()
            storage.write_atomic(pending_uri, json.dumps(pending, sort_keys=True).encode())
            checkpoint("erase.run_pending")
            storage.write_atomic(uri, new)
            report.noncurrent_deleted += storage.purge_history(uri)
            checkpoint("erase.run_shard")
            entry.update(sha256=pending[entry["file"]], rows=kept.num_rows)
            removed += int(gone.sum())
            report.run_shards_rewritten += 1
            changed = True
        elif actual != entry["sha256"]:  # rewritten by an interrupted erase before its manifest
            entry.update(sha256=actual, rows=table.num_rows)
            changed = True
    if not changed:
        return hashlib.sha256(raw).hexdigest()
    counts = manifest.setdefault("counts", {})
    before = int(counts.get("faces", 0))
    counts["faces"] = sum(int(e["rows"]) for e in manifest["shards"] if e["table"] == "faces")
    counts["faces_erased"] = int(counts.get("faces_erased", 0)) + before - counts["faces"]
    manifest["erased_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()  # as writer.write_manifest writes it
    storage.write_atomic(manifest_uri, data)
    checkpoint("erase.run_manifest")
    report.noncurrent_deleted += storage.purge_history(manifest_uri)
    storage.remove(pending_uri)
    report.noncurrent_deleted += storage.purge_history(pending_uri)
    report.run_faces_removed += removed
    report.runs_updated.append(run)
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- index bundles


def sweep_bundle(folder: str, erased: erasure.ErasureSet, run_shas: dict[str, str], report: Report) -> int:
    """Remove erased faces from one bundle version: new files under new names, the manifest last,
    then every file the manifest no longer lists. Returns the faces removed."""
    manifest = read_bundle_manifest(folder)
    with tempfile.TemporaryDirectory(prefix="faceaudit-erase-") as tmp:
        local = bundle.local_copy(folder, manifest, os.path.join(tmp, "src"))
        bundle.verify(local, manifest)  # never carry a damaged file into the new revision
        out = local if storage.is_local(folder) else os.path.join(tmp, "out")
        revision = int(manifest.get("erasure", {}).get("revision", 0)) + 1
        shards, removed = [], 0
        for entry in manifest["shards"]:
            ids = np.load(os.path.join(local, entry["ids"]["file"]))
            gone = shard_mask(local, entry, ids, erased)
            if not gone.any():
                shards.append(entry)
                continue
            shards.append(rewrite_shard(local, out, entry, ids, gone, revision))
            removed += int(gone.sum())
        runs_changed = any(
            run_shas.get(r["uri"], r["manifest_sha256"]) != r["manifest_sha256"]
            for r in manifest.get("runs", [])
        )
        if removed or runs_changed:
            body = revised_manifest(manifest, shards, removed, revision, run_shas)
            upload_new(folder, out, body, manifest)
            checkpoint("erase.bundle_files")
            storage.write_atomic(storage.join(folder, bundle.MANIFEST), bundle.seal(body))
            checkpoint("erase.bundle_manifest")
            manifest = body
    report.noncurrent_deleted += storage.purge_history(storage.join(folder, bundle.MANIFEST))
    delete_unlisted(folder, manifest, report)
    if removed:
        report.bundle_faces_removed[folder] = removed
    return removed


def without_erased(local: str, manifest: dict, staging: str, erased: erasure.ErasureSet) -> tuple[dict, str]:
    """For an export: (manifest, folder) of the bundle in ``local`` without the faces ``erased``
    names, staged in ``staging``; ``local`` itself, untouched, when it holds none of them."""
    if not erased:
        return manifest, local
    revision = int(manifest.get("erasure", {}).get("revision", 0)) + 1
    shards, removed = [], 0
    for entry in manifest["shards"]:
        ids = np.load(os.path.join(local, entry["ids"]["file"]))
        gone = shard_mask(local, entry, ids, erased)
        if gone.any():
            shards.append(rewrite_shard(local, staging, entry, ids, gone, revision))
            removed += int(gone.sum())
            continue
        for item in bundle.bundle_files({"shards": [entry]}):
            target = os.path.join(staging, item["file"])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(local, item["file"]), target)
        shards.append(entry)
    if not removed:
        return manifest, local
    return revised_manifest(manifest, shards, removed, revision, {}), staging


def shard_mask(local: str, entry: dict, ids: np.ndarray, erased: erasure.ErasureSet) -> np.ndarray:
    shas = None
    if erased.whole_images:
        meta = pq.read_table(os.path.join(local, entry["metadata"]["file"]), columns=["image_sha256"])
        shas = meta.column("image_sha256").to_pylist()
    return erased.mask(ids, shas)


def revised(name: str, revision: int) -> str:
    """``shard-0.faissindex`` -> ``shard-0.e1.faissindex``; an earlier ``.eN`` is replaced."""
    stem, ext = os.path.splitext(REVISION.sub("", name))
    return f"{stem}.e{revision}{ext}"


def rewrite_shard(src: str, dst: str, entry: dict, ids: np.ndarray, gone: np.ndarray, revision: int) -> dict:
    """One shard without the ``gone`` rows: FAISS remove_ids, ids, metadata and float16 store."""
    on_disk = bool(entry.get("ivfdata"))
    index = load_writable(os.path.join(src, entry["index"]["file"]), on_disk)
    n = index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids[gone], dtype=np.int64)))
    if n != int(gone.sum()) or index.ntotal != int((~gone).sum()):
        raise FatalError(
            f"{entry['index']['file']}: removed {n} of {int(gone.sum())} faces; the shard and "
            "its id list disagree, erase stops before changing the bundle"
        )
    new = {k: v for k, v in entry.items() if k not in ("index", "ivfdata", "ids", "metadata", "vectors")}
    new["ntotal"] = int(index.ntotal)
    for key in ("index", "ids", "metadata", "vectors", "ivfdata"):
        if entry.get(key):
            os.makedirs(os.path.dirname(os.path.join(dst, entry[key]["file"])) or dst, exist_ok=True)
    if on_disk:
        name = revised(entry["ivfdata"]["file"], revision)
        path = os.path.join(dst, name)
        if os.path.exists(path):
            os.unlink(path)  # a half-written file of an interrupted attempt; nothing lists it
        to_ondisk(index, path)
        new["ivfdata"] = bundle.file_entry(dst, name)
    new["index"] = commit_file(
        dst, revised(entry["index"]["file"], revision), lambda p: faiss.write_index(index, p)
    )
    kept_ids = ids[~gone]
    new["ids"] = commit_file(dst, revised(entry["ids"]["file"], revision), lambda p: np.save(p, kept_ids))
    new["metadata"] = rewrite_metadata(src, dst, entry["metadata"], gone, revision)
    if entry.get("vectors"):
        store = np.load(os.path.join(src, entry["vectors"]["file"]), mmap_mode="r")
        new["vectors"] = commit_file(
            dst, revised(entry["vectors"]["file"], revision), lambda p: copy_rows(store, ~gone, p)
        )
    return new


def load_writable(path: str, on_disk: bool) -> faiss.Index:
    """The whole index in RAM (on-disk lists copied in), so that remove_ids never edits a live file."""
    if not on_disk:
        return faiss.read_index(path)
    index = read_faiss(path, on_disk=True)
    ivf = faiss.extract_index_ivf(index)
    source = ivf.invlists
    assert source is not None
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for lid in range(ivf.nlist):
        size = source.list_size(lid)
        if size:
            lists.add_entries(lid, size, source.get_ids(lid), source.get_codes(lid))
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # type: ignore[attr-defined]  # the index owns them now
    return index


def to_ondisk(index: faiss.Index, path: str) -> None:
    from .build import move_to_ondisk

    move_to_ondisk(index, path)


def commit_file(folder: str, name: str, write) -> dict:
    """``write(path)`` to a temporary name beside ``name``, then rename: readers never see half a file."""
    final = os.path.join(folder, name)
    folder_of, base = os.path.split(final)
    tmp = os.path.join(folder_of, f".{base}{storage.TMP_MARK}{uuid.uuid4().hex}")
    try:
        write(tmp)
        if not os.path.exists(tmp) and os.path.exists(tmp + ".npy"):
            os.replace(tmp + ".npy", tmp)  # np.save appends .npy to a name without it
        os.replace(tmp, final)
    finally:
        for leftover in (tmp, tmp + ".npy"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return bundle.file_entry(folder, name)


def copy_rows(store: np.ndarray, keep: np.ndarray, path: str) -> None:
    rows = np.flatnonzero(keep)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=store.dtype, shape=(len(rows), store.shape[1]))
    step = 65_536
    for lo in range(0, len(rows), step):
        out[lo : lo + step] = store[rows[lo : lo + step]]
    out.flush()
    del out


def rewrite_metadata(src: str, dst: str, entry: dict, gone: np.ndarray, revision: int) -> dict:
    table = pq.read_table(os.path.join(src, entry["file"])).filter(pa.array(~gone))
    name = revised(entry["file"], revision)
    new = commit_file(
        dst, name, lambda p: pq.write_table(table, p, compression="zstd", row_group_size=METADATA_ROW_GROUP)
    )
    return {**new, "rows": table.num_rows, "faces_per_dataset": faces_per_dataset(table)}


def faces_per_dataset(table: pa.Table) -> dict[str, int]:
    """Faces whose image occurs at least once in each data set (as the build counts them)."""
    counts: dict[str, int] = {}
    for occ in table.column("occurrences").to_pylist():
        for name in {o["dataset"] for o in occ}:
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def revised_manifest(
    manifest: dict, shards: list[dict], removed: int, revision: int, run_shas: dict[str, str]
) -> dict:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    body["shards"] = shards
    counts = dict(body.get("counts", {}))
    counts["faces"] = sum(int(s["ntotal"]) for s in shards)
    counts["erased"] = int(counts.get("erased", 0)) + removed
    body["counts"] = counts
    faces: dict[str, int] = {}
    for shard in shards:
        for name, n in shard["metadata"].get("faces_per_dataset", {}).items():
            faces[name] = faces.get(name, 0) + n
    body["datasets"] = [{**d, "faces": faces.get(d["name"], 0)} for d in body.get("datasets", [])]
    body["runs"] = [
        {**r, "manifest_sha256": run_shas.get(r["uri"], r["manifest_sha256"])} for r in body.get("runs", [])
    ]
    previous = body.get("erasure", {})
    body["erasure"] = {
        "revision": revision,
        "faces_removed": int(previous.get("faces_removed", 0)) + removed,
        "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "note": "faces removed after the build; recall figures are the build's",
    }
    return body


def upload_new(folder: str, staging: str, body: dict, old: dict) -> None:
    """Remote bundles: put the new files (those the old manifest does not list) before the manifest."""
    if storage.is_local(folder):
        return
    before = {e["file"] for e in bundle.bundle_files(old)}
    for entry in bundle.bundle_files(body):
        if entry["file"] not in before:
            with open(os.path.join(staging, entry["file"]), "rb") as f:
                storage.write_atomic(storage.join(folder, entry["file"]), f.read())


BUNDLE_FILE = re.compile(
    r"^(shard-\d+(\.e\d+)?\.(faissindex|ivfdata)|metadata/part-\d+(\.e\d+)?\.parquet"
    r"|store/(ids|vectors)-\d+(\.e\d+)?\.npy)$"
)


def delete_unlisted(folder: str, manifest: dict, report: Report) -> None:
    """Bundle files in the version folder that its manifest no longer lists (old revisions, files of
    an interrupted attempt) and temporary files; anything else there is left alone."""
    listed = {e["file"] for e in bundle.bundle_files(manifest)}
    fs, base = storage.url_to_fs(folder)
    base = base.rstrip("/") + "/"
    for path in sorted(fs.find(base)):
        rel = path[len(base) :] if path.startswith(base) else None
        if rel is None or rel in listed:
            continue
        if BUNDLE_FILE.match(rel) or storage.TMP_MARK in rel:
            uri = storage.join(folder, rel)
            storage.remove(uri)
            report.files_deleted += 1
            report.noncurrent_deleted += storage.purge_history(uri)


# ---------------------------------------------------------------- caches


def purge_cache(cache: str, erased: erasure.ErasureSet, versions: list[str]) -> list[str]:
    """Delete cached bundle copies (``<cache>/<version>``) of swept versions or holding an erased id."""
    if not os.path.isdir(cache):
        return []
    names = {v.rstrip("/").rsplit("/", 1)[-1] for v in versions}
    removed = []
    for name in sorted(os.listdir(cache)):
        path = os.path.join(cache, name)
        if os.path.isdir(path) and (name in names or holds_erased(path, erased)):
            shutil.rmtree(path)
            removed.append(path)
    return removed


def holds_erased(folder: str, erased: erasure.ErasureSet) -> bool:
    for ids_file in Path(folder).glob("store/ids-*.npy"):
        try:
            ids = np.load(ids_file, mmap_mode="r")
        except (OSError, ValueError):
            return True  # unreadable cache debris: safer gone
        if erased.mask(np.asarray(ids)).any():
            return True
    return False
