"""Opening a bundle and searching it: ``open_index(uri).search(vectors, k)``.

Each shard is a FAISS index over a disjoint part of the collection, memory-mapped where faiss
allows it, with a sorted face_id array and (for PQ) a float16 vector store beside it, both
memory-mapped. Shards are searched in parallel threads (faiss releases the GIL) and their top k
merged. Metadata rows are sorted by face_id like the id array, so a hit's row is found by binary
search and only the Parquet row groups that hold hits are read.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import faiss
import numpy as np
import pyarrow.parquet as pq

from pipelines.core import erasure, storage

from . import bundle, download, gpu, signing
from .errors import QueryError
from .faiss_io import read_faiss
from .recall import merge_topk

ROW_GROUP_CACHE = 64
RERANK_BLOCK = 32  # queries re-ranked together
ERASED_EXTRA_MAX = 1024  # extra candidates fetched per query to make up for erased hits
ERASURE_RECHECK_S = 10.0  # a long-lived Index looks for new erasure log entries this often


@dataclass(frozen=True, slots=True)
class Occurrence:
    dataset: str
    source_uri: str


@dataclass(slots=True)
class Hit:
    """One indexed face near a query: where its image appears, never who it is."""

    face_id: int
    score: float  # cosine similarity (inner product of unit vectors)
    image_sha256: str
    face_index: int
    bbox: tuple[float, float, float, float]
    det_score: float
    occurrences: list[Occurrence] = field(default_factory=list)


class MetadataPart:
    """One metadata Parquet file, read a row group at a time on demand."""

    def __init__(self, path: str):
        self.file = pq.ParquetFile(path, memory_map=True)
        sizes = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        self.starts = np.cumsum([0, *sizes])
        self.cache: OrderedDict[int, dict] = OrderedDict()
        self.lock = threading.Lock()

    def row(self, position: int) -> dict:
        group = int(np.searchsorted(self.starts, position, side="right") - 1)
        rows = self._group(group)
        offset = position - int(self.starts[group])
        return {name: values[offset] for name, values in rows.items()}

    def _group(self, group: int) -> dict:
        with self.lock:
            if group in self.cache:
                self.cache.move_to_end(group)
                return self.cache[group]
            rows = self.file.read_row_group(group).to_pydict()
            self.cache[group] = rows
            if len(self.cache) > ROW_GROUP_CACHE:
                self.cache.popitem(last=False)
            return rows


class Shard:
    """One FAISS shard with its sorted ids, optional float16 store and metadata."""

    def __init__(self, folder: str, entry: dict, use_gpu: bool = False):
        self.ntotal = int(entry["ntotal"])
        self.index = read_faiss(os.path.join(folder, entry["index"]["file"]), bool(entry.get("ivfdata")))
        if use_gpu and not entry.get("ivfdata"):
            self.index = gpu.to_gpu(self.index)
        self.ivf = faiss.try_extract_index_ivf(self.index) if not use_gpu else None
        self.ids = np.load(os.path.join(folder, entry["ids"]["file"]), mmap_mode="r")
        self.vectors = None
        if entry.get("vectors"):
            self.vectors = np.load(os.path.join(folder, entry["vectors"]["file"]), mmap_mode="r")
        self.metadata = MetadataPart(os.path.join(folder, entry["metadata"]["file"]))
        self.lock = threading.Lock()

    def search(self, x: np.ndarray, k: int, nprobe: int | None, rerank_factor: int) -> tuple:
        depth = min(k * rerank_factor if self.vectors is not None else k, max(self.ntotal, 1))
        with self.lock:  # nprobe is index state; one search per shard at a time
            if nprobe and self.ivf is not None:
                self.ivf.nprobe = nprobe
            elif nprobe and hasattr(self.index, "nprobe"):
                self.index.nprobe = nprobe
            scores, ids = self.index.search(x, depth)
        if self.vectors is not None:
            scores, ids = self.rerank(x, ids)
        return scores[:, :k], ids[:, :k]

    def rerank(self, x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the candidates from the float16 store, best first."""
        assert self.vectors is not None
        valid = ids >= 0
        rows = self.rows(np.where(valid, ids, 0))
        exact = np.empty(ids.shape, dtype=np.float32)
        # a block of queries at a time: the gathered float32 candidates of 1,000 queries x 400
        # candidates x 512 dims would be 800 MB; blocks of 32 took 0.5-0.6 s against 0.75-1.4 s here
        for lo in range(0, len(ids), RERANK_BLOCK):
            block = rows[lo : lo + RERANK_BLOCK]
            vecs = np.asarray(self.vectors[block.ravel()], dtype=np.float32).reshape(*block.shape, -1)
            exact[lo : lo + RERANK_BLOCK] = np.matmul(vecs, x[lo : lo + RERANK_BLOCK, :, None])[..., 0]
        exact = np.where(valid, exact, -np.inf).astype(np.float32)
        order = np.argsort(-exact, axis=1, kind="stable")
        return np.take_along_axis(exact, order, 1), np.take_along_axis(ids, order, 1)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, ids)


def drop_erased(scores: np.ndarray, ids: np.ndarray, erased: erasure.ErasureSet, k: int) -> tuple:
    """The first k hits per row that the erasure log does not name; -1 ids pad short rows."""
    if not erased:
        return scores[:, :k], ids[:, :k]
    gone = erased.mask(np.where(ids >= 0, ids, 0)) & (ids >= 0)
    out_s = np.full((ids.shape[0], k), -np.inf, dtype=np.float32)
    out_i = np.full((ids.shape[0], k), -1, dtype=np.int64)
    for row in range(ids.shape[0]):
        keep = np.flatnonzero(~gone[row])[:k]
        out_s[row, : len(keep)] = scores[row, keep]
        out_i[row, : len(keep)] = ids[row, keep]
    return out_s, out_i


class Index:
    """An opened, verified bundle. ``search`` returns, per query, up to k hits best first."""

    def __init__(
        self,
        manifest: dict,
        folder: str,
        use_gpu: bool = False,
        threads: int | None = None,
        erasure_log: str | None = None,
    ):
        self.manifest = manifest
        self.folder = folder
        # faces the log names are never returned, even before the erase sweep has removed them
        self.erasure_log = erasure_log
        self.erased = erasure.load(erasure_log)
        self.erased_checked = time.monotonic()
        self.shards = [Shard(folder, entry, use_gpu) for entry in manifest["shards"]]
        self.pool = ThreadPoolExecutor(max_workers=threads or min(len(self.shards), os.cpu_count() or 1))

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def model_id(self) -> str:
        return str(self.manifest["model_id"])

    @property
    def match_threshold(self) -> float:
        return bundle.check_threshold(self.manifest)  # in (0, 1), or IntegrityError

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    def search_ids(
        self, vectors: np.ndarray, k: int = 10, nprobe: int | None = None, rerank_factor: int | None = None
    ) -> tuple:
        """(scores, face_ids) arrays [n, k], best first; -1 ids pad short rows."""
        x = self.check_query(vectors)
        nprobe = nprobe or self.manifest.get("nprobe")
        factor = int(rerank_factor or self.manifest.get("rerank_factor") or 1)
        self.recheck_erasures()
        depth = k + min(len(self.erased.faces), ERASED_EXTRA_MAX)
        parts = list(self.pool.map(lambda s: s.search(x, depth, nprobe, factor), self.shards))
        scores, ids = merge_topk([p[0] for p in parts], [p[1] for p in parts], depth)
        return drop_erased(scores, ids, self.erased, k)

    def recheck_erasures(self, force: bool = False) -> None:
        """Pick up erasures logged since the index was opened (a service keeps it open for days)."""
        if not self.erasure_log or (not force and time.monotonic() - self.erased_checked < ERASURE_RECHECK_S):
            return
        names = tuple(erasure.ErasureLog(self.erasure_log).entry_names())
        if names != self.erased.entries:
            self.erased = erasure.load(self.erasure_log)
        self.erased_checked = time.monotonic()

    def search(
        self, vectors: np.ndarray, k: int = 10, nprobe: int | None = None, model_id: str | None = None
    ) -> list[list[Hit]]:
        if model_id is not None and model_id != self.model_id:
            raise QueryError(f"query vectors are from model {model_id!r}; this index holds {self.model_id!r}")
        scores, ids = self.search_ids(vectors, k, nprobe)
        return [self.hits(s, i) for s, i in zip(scores, ids, strict=True)]

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        out = []
        for score, face_id in zip(scores, ids, strict=True):
            if face_id < 0:
                continue
            out.append(self.hit(int(face_id), float(score)))
        return out

    def hit(self, face_id: int, score: float) -> Hit:
        for shard in self.shards:
            row = int(shard.rows(np.array([face_id]))[0])
            if row < shard.ntotal and int(shard.ids[row]) == face_id:
                meta = shard.metadata.row(row)
                occ = [Occurrence(o["dataset"], o["source_uri"]) for o in meta["occurrences"]]
                x1, y1, x2, y2 = (float(v) for v in meta["bbox"])
                return Hit(
                    face_id,
                    score,
                    meta["image_sha256"],
                    int(meta["face_index"]),
                    (x1, y1, x2, y2),
                    float(meta["det_score"]),
                    occ,
                )
        raise KeyError(f"face_id {face_id} is in no shard's id list")

    def check_query(self, vectors: np.ndarray) -> np.ndarray:
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise QueryError(f"query vectors have shape {x.shape}; this index takes [n, {self.dim}]")
        return np.ascontiguousarray(x)

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def open_index(
    uri: str,
    verify: bool = True,
    use_gpu: bool | None = False,
    cache_dir: str | None = None,
    erasure_log: str | None = None,
    public_key: signing.PublicKeyLike = None,
) -> Index:
    """Open the version CURRENT names (or a version folder), after checking every file's sha256.

    With a public key (``public_key=``: a PEM path, PEM bytes or a key object; else
    ``$FACEAUDIT_PUBLIC_KEY``) the manifest must carry a valid Ed25519 signature by that key, or
    IntegrityError. Signed or not, the manifest's names, declared sizes and match_threshold are
    checked before anything is downloaded or parsed (bundle.py). A remote bundle is first
    downloaded to ``cache_dir`` (default ``~/.cache/faceaudit/index``); faiss and numpy memory-map
    local files only. Faces named by the erasure log (default ``<index root>/_erasure``) are never
    returned (docs/erasure.md).
    """
    key = signing.public_key(public_key)
    folder, _ = bundle.resolve(uri)
    log = erasure_log or erasure.default_log(bundle.root_of(folder))
    manifest = bundle.parse_manifest(storage.read_bytes(storage.join(folder, bundle.MANIFEST)))
    signing.check(manifest, key)
    bundle.check_version(manifest)
    bundle.check_threshold(manifest)
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "faceaudit", "index")
    local = download.local_copy(folder, manifest, cache)  # a remote bundle: verified before it is used
    if storage.is_local(folder):
        # sizes declared inside the files are always checked before faiss reads them; sha256 on request
        (bundle.verify if verify else bundle.check_declared)(local, manifest)
    return Index(manifest, local, use_gpu=gpu.wanted(use_gpu), erasure_log=log)
