"""``faceaudit export`` and ``faceaudit verify``: copy a version's bundle elsewhere, re-sharded if
asked, and check a bundle's manifest and checksums where it lies (local or gs://).

An export is itself a bundle: ``<to>/<version>/`` with a sealed manifest written last and
``<to>/CURRENT`` moved to it, so ``open_index``, ``verify`` and a further export accept it. The
source is verified (every sha256) before anything is copied, so a damaged bundle never spreads.

Re-sharding splits the collection into N shards by face_id range (equal counts): each new shard's
FAISS index is the source's trained index holding the source vectors in its range (faiss
``remove_ids`` + ``merge_from``: codes are moved, never re-encoded), and its ids, metadata and
float16 store are the matching rows, still sorted by face_id. Search results therefore stay those
of the source (with re-ranking, each shard contributes its own candidates, so never fewer).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import erasure, storage
from pipelines.core.errors import ConfigError
from pipelines.core.names import check_name

from . import bundle, download, erase, signing
from .errors import IntegrityError
from .export_records import record_export
from .faiss_io import write_faiss
from .shard import METADATA_ROW_GROUP


@dataclass(slots=True)
class ExportResult:
    folder: str
    version: str
    shards: int
    files: int
    bytes: int


# ---------------------------------------------------------------- verify


def verify_bundle(uri: str, public_key: signing.PublicKeyLike = None) -> tuple[str, dict]:
    """(version folder, manifest) of a bundle root (via CURRENT) or a version folder, after checking
    the manifest's checksum, its signature (with ``public_key`` or ``$FACEAUDIT_PUBLIC_KEY``), its
    names, and every listed file's size and sha256 in place; IntegrityError names the first bad
    file."""
    key = signing.public_key(public_key)
    folder, version = bundle.resolve(uri)
    manifest = bundle.parse_manifest(storage.read_bytes(storage.join(folder, bundle.MANIFEST)))
    signing.check(manifest, key)
    if manifest.get("version") != version:
        raise IntegrityError(
            bundle.MANIFEST, f"names version {manifest.get('version')!r} but lies in {version!r}"
        )
    bundle.verify_in_place(folder, manifest)
    return folder, manifest


# ---------------------------------------------------------------- export


def export(
    index: str,
    to: str,
    shards: int | None = None,
    version: str | None = None,
    public_key: signing.PublicKeyLike = None,
) -> ExportResult:
    """Copy the version CURRENT names (or ``version``) of ``index`` to ``to`` and move ``to``'s CURRENT.
    The manifest is signed with the active signing key (``signing.signing_with``), if any."""
    source = storage.join(index, check_name(version, "version")) if version else index
    folder, manifest = verify_bundle(source, public_key)
    name = manifest["version"]
    target = storage.join(to, name)
    if storage.exists(storage.join(target, bundle.MANIFEST)):
        raise ConfigError(f"{target} already holds an exported version {name}")
    if shards is not None and shards < 1:
        raise ConfigError(f"--shards must be at least 1, not {shards}")
    with tempfile.TemporaryDirectory(prefix="faceaudit-export-") as tmp:
        local = download.local_copy(folder, manifest, os.path.join(tmp, "source"))
        bundle.verify(local, manifest)  # what was downloaded is what was verified
        # faces the source's erasure log names never leave in an export, even mid-erasure
        erased = erasure.load(erasure.default_log(bundle.root_of(folder)))
        manifest, local = erase.without_erased(local, manifest, os.path.join(tmp, "unerased"), erased)
        if shards is None or shards == len(manifest["shards"]):
            body, staged = manifest, local
        else:
            staged = os.path.join(tmp, "resharded")
            body = reshard(local, manifest, shards, staged)
            body["exported_from"] = {"version": name, "shards": len(manifest["shards"])}
        for entry in bundle.bundle_files(body):
            copy_file(os.path.join(staged, entry["file"]), storage.join(target, entry["file"]))
    storage.write_atomic(storage.join(target, bundle.MANIFEST), bundle.seal(body), create_only=True)
    bundle.move_current(to, name)
    record_export(bundle.root_of(folder), to)
    files = list(bundle.bundle_files(body))
    return ExportResult(target, name, len(body["shards"]), len(files) + 1, sum(f["bytes"] for f in files))


def copy_file(local: str, uri: str) -> None:
    """One file, whole (a temporary name then a rename locally; one upload on GCS)."""
    if storage.is_local(uri):
        path = storage.url_to_fs(uri)[1]
        storage.make_dirs(os.path.dirname(path))
        tmp = f"{path}{storage.TMP_MARK}export"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a killed export's
        with open(local, "rb") as src, os.fdopen(storage.create_private(tmp), "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        os.replace(tmp, path)
        return
    fs, remote = storage.url_to_fs(uri)
    fs.put_file(local, remote)


# ---------------------------------------------------------------- re-sharding


def split_points(ids: np.ndarray, n_shards: int) -> list[tuple[int, int]]:
    """[lo, hi) face_id ranges holding equal shares of the sorted ``ids`` (no empty shard)."""
    n = len(ids)
    if n_shards > n:
        raise ConfigError(f"cannot split {n} faces into {n_shards} shards")
    cuts = [n * k // n_shards for k in range(n_shards + 1)]
    top = int(ids[-1]) + 1
    return [(int(ids[a]), int(ids[b]) if b < n else top) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def reshard(local: str, manifest: dict, n_shards: int, staged: str) -> dict:
    """Write ``n_shards`` new shards of the bundle in ``local`` to ``staged``; returns the new manifest."""
    if manifest.get("on_disk"):
        raise ConfigError(
            "re-sharding a bundle with on-disk inverted lists is not supported; export it as it is"
        )
    for sub in ("metadata", "store"):
        storage.make_dirs(os.path.join(staged, sub))
    old = [OldShard(local, entry) for entry in manifest["shards"]]
    all_ids = np.sort(np.concatenate([s.ids for s in old]))
    entries = [
        write_new_shard(staged, k, old, lo, hi) for k, (lo, hi) in enumerate(split_points(all_ids, n_shards))
    ]
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    body["shards"] = entries
    for key in bundle.COPIES_KEYS if manifest.get("copies") else ():  # one table for the collection
        name = manifest["copies"][key]["file"]
        storage.make_dirs(os.path.dirname(os.path.join(staged, name)))
        shutil.copyfile(os.path.join(local, name), os.path.join(staged, name))
    return body


class OldShard:
    """A source shard read whole: its FAISS index, sorted ids, metadata and optional float16 store."""

    def __init__(self, folder: str, entry: dict):
        self.index = faiss.read_index(os.path.join(folder, entry["index"]["file"]))
        self.ids = np.load(os.path.join(folder, entry["ids"]["file"]))
        self.meta = pq.read_table(os.path.join(folder, entry["metadata"]["file"]))
        self.vectors = (
            np.load(os.path.join(folder, entry["vectors"]["file"]), mmap_mode="r")
            if entry.get("vectors")
            else None
        )

    def rows(self, lo: int, hi: int) -> tuple[int, int]:
        a, b = np.searchsorted(self.ids, [lo, hi])
        return int(a), int(b)

    def part(self, lo: int, hi: int) -> faiss.Index:
        """A copy of this shard's index holding only face_ids in [lo, hi)."""
        copy = faiss.clone_index(self.index)
        copy.remove_ids(faiss.IDSelectorNot(faiss.IDSelectorRange(lo, hi)))
        return copy


def write_new_shard(staged: str, k: int, old: list[OldShard], lo: int, hi: int) -> dict:
    index = faiss.clone_index(old[0].index)
    index.reset()  # the trained, empty index: the same quantizer and codebooks
    ids, metas, vectors = [], [], []
    for shard in old:
        a, b = shard.rows(lo, hi)
        if a == b:
            continue
        index.merge_from(shard.part(lo, hi), 0)
        ids.append(shard.ids[a:b])
        metas.append(shard.meta.slice(a, b - a))
        if shard.vectors is not None:
            vectors.append(np.asarray(shard.vectors[a:b]))
    all_ids = np.concatenate(ids)
    order = np.argsort(all_ids, kind="stable")
    entry: dict = {"shard": k, "ntotal": int(len(all_ids))}
    if index.ntotal != len(all_ids):
        raise IntegrityError(f"shard-{k}.faissindex", f"holds {index.ntotal} vectors for {len(all_ids)} ids")
    entry.update(write_faiss(staged, k, index, on_disk=False))
    np.save(os.path.join(staged, f"store/ids-{k}.npy"), all_ids[order])
    entry["ids"] = bundle.file_entry(staged, f"store/ids-{k}.npy")
    meta = pa.concat_tables(metas).take(pa.array(order))
    name = f"metadata/part-{k}.parquet"
    pq.write_table(meta, os.path.join(staged, name), compression="zstd", row_group_size=METADATA_ROW_GROUP)
    entry["metadata"] = {
        **bundle.file_entry(staged, name),
        "rows": meta.num_rows,
        "faces_per_dataset": faces_per_dataset(meta),
    }
    if vectors:
        np.save(os.path.join(staged, f"store/vectors-{k}.npy"), np.concatenate(vectors)[order])
        entry["vectors"] = bundle.file_entry(staged, f"store/vectors-{k}.npy")
    return entry


def faces_per_dataset(meta: pa.Table) -> dict[str, int]:
    """Faces whose image occurs at least once in each data set, from the metadata's occurrences."""
    occ = meta.column("occurrences").combine_chunks()
    flat = pc.list_flatten(occ)
    pairs = pa.table({"face": pc.list_parent_indices(occ), "dataset": pc.struct_field(flat, [0])})
    distinct = pairs.group_by(["face", "dataset"], use_threads=False).aggregate([])
    counts = distinct.group_by("dataset", use_threads=False).aggregate([("face", "count")])
    return dict(
        sorted(
            zip(counts.column("dataset").to_pylist(), counts.column("face_count").to_pylist(), strict=True)
        )
    )
