"""Sweeping index bundles: each version (or export) rewritten without the erased faces under new
file names, the manifest last, then every file it no longer lists; and the download caches."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import erasure, storage
from pipelines.core.errors import FatalError
from pipelines.core.faults import checkpoint

from .. import bundle, copies, download
from ..faiss_io import load_writable, move_to_ondisk
from ..lookup import copies_hash_rows, hash_rows
from .report import Report

METADATA_ROW_GROUP = 4096
REVISION = re.compile(r"\.e\d+(?=\.[^./]+$)")


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


def read_bundle_manifest(folder: str) -> dict:
    return bundle.parse_manifest(storage.read_bytes(storage.join(folder, bundle.MANIFEST)))


def default_cache() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "faceaudit", "index")


def sweep_bundle(folder: str, erased: erasure.ErasureSet, run_shas: dict[str, str], report: Report) -> int:
    """Remove erased faces from one bundle version: new files under new names, the manifest last,
    then every file the manifest no longer lists. Returns the faces removed."""
    manifest = read_bundle_manifest(folder)
    with tempfile.TemporaryDirectory(prefix="faceaudit-erase-") as tmp:
        local = download.local_copy(folder, manifest, os.path.join(tmp, "src"))
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
        kept_copies = rewrite_copies(local, out, manifest, erased, revision)
        if removed or runs_changed or kept_copies:
            body = revised_manifest(manifest, shards, removed, revision, run_shas)
            body.update({"copies": kept_copies} if kept_copies else {})
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
            storage.make_dirs(os.path.dirname(target))
            shutil.copyfile(os.path.join(local, item["file"]), target)
        shards.append(entry)
    kept_copies = rewrite_copies(local, staging, manifest, erased, revision)
    if not removed and not kept_copies:
        return manifest, local
    if manifest.get("copies") and not kept_copies:
        for key in bundle.COPIES_KEYS:
            name = manifest["copies"][key]["file"]
            storage.make_dirs(os.path.dirname(os.path.join(staging, name)))
            shutil.copyfile(os.path.join(local, name), os.path.join(staging, name))
    body = revised_manifest(manifest, shards, removed, revision, {})
    body.update({"copies": kept_copies} if kept_copies else {})
    return body, staging


def rewrite_copies(
    src: str, dst: str, manifest: dict, erased: erasure.ErasureSet, revision: int
) -> dict | None:
    """The copies table (and its range hashes) without the images ``erased`` names, committed in
    ``dst`` under revised names; its new manifest entry, or None when it holds none of them (or
    the bundle has no copies table). Groups keep their ids: what remains of a group is still
    one photo's copies."""
    entry = manifest.get("copies")
    if not entry or not erased:
        return None
    table = pq.read_table(os.path.join(src, entry["table"]["file"]))
    kept = copies.drop_erased(table, erased)
    if kept.num_rows == table.num_rows:
        return None
    storage.make_dirs(os.path.join(dst, "copies"))
    hashes = copies_hash_rows(kept)
    new = {**entry, **copies.summary(kept)}
    for key, data in (("table", kept), ("hashes", hashes)):
        written = commit_file(
            dst,
            revised(entry[key]["file"], revision),
            lambda p, d=data: pq.write_table(d, p, compression="zstd"),
        )
        new[key] = {**written, "rows": data.num_rows}
    return new


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
    rewritten = ("index", "ivfdata", "ids", "metadata", "vectors", "hashes")
    new = {k: v for k, v in entry.items() if k not in rewritten}
    new["ntotal"] = int(index.ntotal)
    for key in rewritten:
        if entry.get(key):
            storage.make_dirs(os.path.dirname(os.path.join(dst, entry[key]["file"])) or dst)
    if on_disk:
        name = revised(entry["ivfdata"]["file"], revision)
        path = os.path.join(dst, name)
        if os.path.exists(path):
            os.unlink(path)  # a half-written file of an interrupted attempt; nothing lists it
        move_to_ondisk(index, path)
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
    if entry.get("hashes"):  # the range look-up's table: hashes of the erased images' URLs go too
        new["hashes"] = rewrite_hashes(dst, new["metadata"]["file"], entry["hashes"], revision)
    return new


def rewrite_hashes(dst: str, metadata: str, entry: dict, revision: int) -> dict:
    """The shard's hash table made again from its rewritten metadata."""
    table = hash_rows(pq.read_table(os.path.join(dst, metadata), columns=["image_sha256", "occurrences"]))
    new = commit_file(
        dst, revised(entry["file"], revision), lambda p: pq.write_table(table, p, compression="zstd")
    )
    return {**new, "rows": table.num_rows}


def commit_file(folder: str, name: str, write) -> dict:
    """``write(path)`` to a temporary name beside ``name``, then rename: readers never see half a file."""
    final = os.path.join(folder, name)
    folder_of, base = os.path.split(final)
    tmp = os.path.join(folder_of, f".{base}{storage.TMP_MARK}{uuid.uuid4().hex}")
    try:
        write(tmp)
        if not os.path.exists(tmp) and os.path.exists(tmp + ".npy"):
            os.replace(tmp + ".npy", tmp)  # np.save appends .npy to a name without it
        storage.make_private(tmp)  # written by faiss, numpy or pyarrow with the default mode
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
        if bundle.BUNDLE_FILE.match(rel) or storage.TMP_MARK in rel:
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
