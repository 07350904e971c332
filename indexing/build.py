"""``build_index``: committed runs in, a verified index bundle out (after autofaiss's distributed build).

The driver makes every decision; the per-shard work is one pure function that any engine runs:

1. face_id column only: check every faces shard's sha256 and model, find each face_id's first row
   (duplicates across runs are dropped) and keep 64 bits of its image's sha256.
2. embeddings of a seeded random sample: the training set and disjoint held-out queries; train once.
3. one pass over the images shards (each checked against its sha256): every occurrence of an
   indexed image is routed to the bundle shards that hold its faces (a spill file per shard).
4. bundle shard k is kept rows ``[k*V, (k+1)*V)``: ``build_shard`` adds them with their global
   face_ids into a copy of the trained index and commits the shard's files, and returns their
   entries and the exact top-k of the held-out queries over its rows. The local engine runs the
   shards here in order; ``build_ray`` and ``build_beam`` run them as Ray tasks / Beam workers.

Then nprobe is tuned on the written shards against the merged exact top-k, the manifest is written
last and CURRENT moved. Memory is bounded by a record batch and one shard, never the collection.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import garbage
from pipelines.core import erasure, orphans, storage
from pipelines.core.errors import ConfigError
from pipelines.core.faults import checkpoint

from . import bundle, erase, gpu
from . import runs as runsmod
from .params import FLAT_MAX, IndexPlan, choose_plan
from .recall import (
    ExactTopK,
    RecallReport,
    drop_self,
    measure,
    merge_topk,
    rerank_factors,
    tune_nprobe,
    tune_nprobe_and_depth,
)
from .runs import META_COLUMNS, Run, Shard
from .search import Index

METADATA_ROW_GROUP = 4096
KMEANS_ITERATIONS = 10
TOP_K = 11  # exact neighbours kept per held-out query: its own face plus 10
BUILD_DIR = "_build"  # per-build scratch inside the version folder (occurrence spills), removed at the end
OCCURRENCE = pa.struct([("dataset", pa.string()), ("source_uri", pa.string())])
OCCURRENCE_COLUMNS = ["image_sha256", "dataset", "source_uri"]


@dataclass(slots=True)
class BuildOptions:
    """How to build; every field has a CLI flag of the same name."""

    max_bytes_per_vector: int | None = None  # RAM per vector (codes + id); None: no budget
    opq: bool = False
    rerank: bool = True  # exact re-ranking from an on-disk float16 store (PQ only)
    rerank_factor: int = 10  # candidates per wanted hit that are re-ranked (the first factor tried)
    on_disk: bool = False  # inverted lists in a memory-mapped .ivfdata file (IVF only)
    target_recall: float = 0.95
    vectors_per_shard: int = 1_000_000
    recall_queries: int = 1000
    seed: int = 1234
    use_gpu: bool | None = None  # None: when faiss sees one
    flat_max: int = FLAT_MAX
    nlist: int | None = None
    threads: int | None = None
    max_rerank_factor: int = 80  # the re-rank factor doubles up to this while recall misses the target
    erasure_log: str | None = None  # default: <out>/_erasure; faces it names are never indexed


@dataclass(slots=True)
class Inputs:
    """The faces shards in read order and, per shard, which rows survive de-duplication and 64 bits
    of each row's image sha256 (to route occurrences to bundle shards)."""

    shards: list[Shard]
    keep: list[np.ndarray]
    keys: list[np.ndarray]
    rows: int
    erased: int = 0  # rows an erasure log names (docs/erasure.md)

    @property
    def unique(self) -> int:
        return int(sum(int(k.sum()) for k in self.keep))


@dataclass(slots=True)
class Piece:
    """The rows of one faces shard that go into one bundle shard (row numbers in the file, sorted)."""

    shard: Shard
    rows: np.ndarray


@dataclass(slots=True)
class ShardTask:
    """Everything bundle shard ``k`` needs besides the trained index and the queries; picklable."""

    k: int
    folder: str  # the version folder (local or gs://) the shard's files are committed to
    pieces: list[Piece]
    occurrences: str  # parquet of the occurrences of this shard's images (a superset)
    rerank: bool
    on_disk: bool
    dim: int
    use_gpu: bool


@dataclass(slots=True)
class ShardResult:
    """A written shard: its manifest entry and the exact top-k of the queries over its rows."""

    entry: dict
    scores: np.ndarray
    ids: np.ndarray


# Runs every task with the trained index (faiss.serialize_index bytes) and the queries; returns
# the results in task order. The local runner is below; build_ray and build_beam provide others.
ShardRunner = Callable[[list[ShardTask], bytes, np.ndarray], list[ShardResult]]


class Stopwatch:
    """Seconds spent per build phase, recorded in the manifest (to see where a build's time goes)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.mark = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self.mark, 2)
        self.mark = now


@dataclass(slots=True)
class BuildResult:
    folder: str
    version: str
    manifest: dict
    seconds: float


def run_local(tasks: list[ShardTask], trained: bytes, queries: np.ndarray) -> list[ShardResult]:
    """The local engine: every shard in this process, one after another."""
    return [build_shard(task, trained, queries) for task in tasks]


def build_index(
    run_uris: list[str], out: str, options: BuildOptions | None = None, runner: ShardRunner | None = None
) -> BuildResult:
    """Build a new version under ``out`` from the committed runs and point CURRENT at it.

    ``runner`` runs the per-shard adds (default: here, in order). Every runner gives the same
    files, so the engine is not part of the version's input digest.
    """
    opts = options or BuildOptions()
    started = time.time()
    if opts.threads:
        faiss.omp_set_num_threads(opts.threads)
    runs = runsmod.find_runs(run_uris)
    with erase.sweep_lock(out, holder="an index build"):  # an erasure sweep rewrites runs we read
        return _build_locked(runs, out, opts, runner, started)


def _build_locked(
    runs: list[Run], out: str, opts: BuildOptions, runner: ShardRunner | None, started: float
) -> BuildResult:
    watch = Stopwatch()
    model_id, dim = runsmod.check_same_model(runs)
    log_uri = opts.erasure_log or erasure.default_log(out)
    erased = erasure.load(log_uri)
    inputs = scan_ids(runs, model_id, erased)
    watch.lap("scan_ids")
    if inputs.unique == 0:
        raise ConfigError("the runs hold no faces; nothing to index")
    plan = choose_plan(
        inputs.unique,
        dim,
        opts.max_bytes_per_vector,
        opts.opq,
        opts.rerank,
        opts.flat_max,
        opts.nlist,
        opts.on_disk,
    )
    use_gpu = gpu.wanted(opts.use_gpu)
    version = bundle.fresh_version(out, input_digest(runs, opts))
    folder = storage.join(out, version)
    garbage.clean_unpublished(out)  # what killed builds left (it holds embeddings)
    with orphans.in_progress(folder):  # the next build and `faceaudit gc` leave a live build alone
        body = build_into(
            folder, runs, inputs, plan, opts, use_gpu, model_id, dim, runner or run_local, watch
        )
        body.update(
            version=version,
            created_at=iso_now(),
            build_seconds=round(time.time() - started, 1),
            built_on_gpu=use_gpu,
            build_phases=watch.laps,
        )
        commit_bundle(out, version, body, erased.entries, log_uri)
    return BuildResult(folder, version, body, time.time() - started)


def build_into(
    folder: str,
    runs: list[Run],
    inputs: Inputs,
    plan: IndexPlan,
    opts: BuildOptions,
    use_gpu: bool,
    model_id: str,
    dim: int,
    runner: ShardRunner,
    watch: Stopwatch,
) -> dict:
    queries, query_ids, trained = train(inputs, plan, opts, use_gpu, dim)
    watch.lap("train")
    bounds = shard_bounds(inputs.unique, opts.vectors_per_shard)
    spills = spill_occurrences(runs, inputs, bounds, folder)
    watch.lap("route_occurrences")
    tasks = [
        ShardTask(k, folder, pieces_for(inputs, lo, hi), spills[k], plan.rerank, opts.on_disk, dim, use_gpu)
        for k, (lo, hi) in enumerate(bounds)
    ]
    results = runner(tasks, trained, queries)
    watch.lap("add_shards")
    storage.remove(storage.join(folder, BUILD_DIR))
    shards = [r.entry for r in results]
    truth = merged_top_k(queries, results)
    report = measure_recall(folder, shards, plan, opts, queries, query_ids, truth, model_id, dim)
    watch.lap("tune_nprobe")
    return manifest_body(runs, inputs, plan, opts, shards, report, model_id, dim)


def commit_bundle(out: str, version: str, body: dict, honoured: tuple[str, ...], log_uri: str) -> None:
    """The shards are committed already: write the manifest last (create-only), then move CURRENT,
    once any erasure logged since the scan (``honoured``: the entries it read) is swept from it."""
    checkpoint("index.before_manifest")
    storage.write_atomic(storage.join(out, version, bundle.MANIFEST), bundle.seal(body), create_only=True)
    erase.catch_up(out, honoured, log_uri, body)
    checkpoint("index.before_current")
    bundle.move_current(out, version)


# ---------------------------------------------------------------- driver: scan, sample, train


def scan_ids(runs: list[Run], model_id: str, erased: erasure.ErasureSet = erasure.EMPTY) -> Inputs:
    """Pass 1: verify shards, read face_ids, keep each face_id's first row in run/shard order,
    unless an erasure log names the face."""
    shards = [s for r in runs for s in r.faces]
    per_shard, keys, gone = [], [], []
    for shard in shards:
        runsmod.verify_shard(shard)
        ids, shas = [], []
        for batch in runsmod.iter_batches(shard, ["face_id", "model_id", "image_sha256"]):
            runsmod.check_batch_model(batch, model_id, shard)
            ids.append(batch.column(0).to_numpy())
            shas.append(runsmod.sha_keys(batch.column(2), shard.uri))
            if erased:
                shas_of_rows = batch.column(2).to_pylist() if erased.whole_images else None
                gone.append(erased.mask(ids[-1], shas_of_rows))
        per_shard.append(np.concatenate(ids) if ids else np.zeros(0, np.int64))
        keys.append(np.concatenate(shas) if shas else np.zeros(0, np.uint64))
    all_ids = np.concatenate(per_shard) if per_shard else np.zeros(0, np.int64)
    keep = np.zeros(len(all_ids), dtype=bool)
    keep[np.unique(all_ids, return_index=True)[1]] = True
    erased_rows = np.concatenate(gone) if gone else np.zeros(len(all_ids), dtype=bool)
    keep &= ~erased_rows
    cuts = np.cumsum([0, *[len(a) for a in per_shard]])
    return Inputs(
        shards,
        [keep[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)],
        keys,
        len(all_ids),
        int(erased_rows.sum()),
    )


def kept_batches(inputs: Inputs, columns: list[str]):
    """(kept-row offset, kept rows of a batch) over every faces shard, in build order."""
    offset = 0
    for shard, keep in zip(inputs.shards, inputs.keep, strict=True):
        row = 0
        for batch in runsmod.iter_batches(shard, columns):
            mask = keep[row : row + batch.num_rows]
            row += batch.num_rows
            kept = batch.filter(pa.array(mask)) if not mask.all() else batch
            if kept.num_rows:
                yield offset, kept
                offset += kept.num_rows


def read_positions(inputs: Inputs, positions: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: (vectors, face_ids) at kept-row ``positions``, in the order given."""
    order = np.argsort(positions, kind="stable")
    wanted = positions[order]
    vecs = np.zeros((len(positions), dim), dtype=np.float32)
    ids = np.zeros(len(positions), dtype=np.int64)
    for offset, batch in kept_batches(inputs, ["face_id", "embedding"]):
        lo, hi = np.searchsorted(wanted, [offset, offset + batch.num_rows])
        if lo == hi:
            continue
        local = wanted[lo:hi] - offset
        vecs[order[lo:hi]] = runsmod.embeddings(batch, dim)[local]
        ids[order[lo:hi]] = batch.column(0).to_numpy()[local]
    return vecs, ids


def train(
    inputs: Inputs, plan: IndexPlan, opts: BuildOptions, use_gpu: bool, dim: int
) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(held-out queries, their face_ids, the trained empty index serialised), from a seeded sample."""
    rng = np.random.default_rng(opts.seed)
    n = inputs.unique
    n_queries = min(opts.recall_queries, max(1, n // 10))
    picks = rng.permutation(n)
    query_pos = np.sort(picks[:n_queries])
    train_pos = np.sort(picks[n_queries : n_queries + plan.train_size]) if plan.train_size else query_pos[:0]
    sample = read_positions(inputs, np.concatenate([query_pos, train_pos]), dim)
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # k-means is most of a build's time; pin faiss 1.15's default of 10 iterations across versions
        ivf.cp.niter = KMEANS_ITERATIONS
    if not index.is_trained:
        gpu.train(index, sample[0][n_queries:], use_gpu)
    return sample[0][:n_queries], sample[1][:n_queries], faiss.serialize_index(index).tobytes()


def shard_bounds(n: int, per_shard: int) -> list[tuple[int, int]]:
    """Bundle shard k holds kept rows [k*per_shard, (k+1)*per_shard): fixed by n alone, whatever runs them."""
    return [(lo, min(lo + per_shard, n)) for lo in range(0, n, per_shard)]


def pieces_for(inputs: Inputs, lo: int, hi: int) -> list[Piece]:
    """The faces-shard rows that are kept rows [lo, hi), in build order."""
    pieces, offset = [], 0
    for shard, keep in zip(inputs.shards, inputs.keep, strict=True):
        kept = np.flatnonzero(keep)
        a, b = max(lo - offset, 0), min(hi - offset, len(kept))
        if a < b:
            pieces.append(Piece(shard, kept[a:b]))
        offset += len(kept)
    return pieces


# ---------------------------------------------------------------- driver: route occurrences


def spill_occurrences(
    runs: list[Run], inputs: Inputs, bounds: list[tuple[int, int]], folder: str
) -> list[str]:
    """One pass over the images shards: each occurrence of an indexed image goes to the spill file of
    every bundle shard holding one of its faces. Returns the spills' URIs, one per shard.

    Images are matched on 64 bits of their sha256: a collision only adds a row that the shard's
    exact match on the full sha256 drops. Memory: 24 bytes per kept face, plus one batch.
    """
    keys = np.concatenate([k[m] for k, m in zip(inputs.keys, inputs.keep, strict=True)])
    shard_of = np.zeros(len(keys), dtype=np.int64)
    for k, (lo, hi) in enumerate(bounds):
        shard_of[lo:hi] = k
    order = np.lexsort((shard_of, keys))
    keys, shard_of = keys[order], shard_of[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = (keys[1:] != keys[:-1]) | (shard_of[1:] != shard_of[:-1])
    keys, shard_of = keys[first], shard_of[first]
    local_dir = tempfile.mkdtemp(prefix="faceaudit-occurrences-")
    try:
        paths = write_spills(runs, keys, shard_of, len(bounds), local_dir)
        return [publish_spill(path, folder) for path in paths]
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


def write_spills(
    runs: list[Run], keys: np.ndarray, shard_of: np.ndarray, n_shards: int, local_dir: str
) -> list[str]:
    schema = pa.schema([(c, pa.string()) for c in OCCURRENCE_COLUMNS])
    paths = [os.path.join(local_dir, f"occurrences-{k}.parquet") for k in range(n_shards)]
    writers = [pq.ParquetWriter(p, schema, compression="zstd") for p in paths]
    try:
        for batch in runsmod.image_batches(runs, OCCURRENCE_COLUMNS):
            batch = batch.filter(pc.is_valid(batch.column(0)))
            batch_keys = runsmod.sha_keys(batch.column(0), "an images shard")
            lo = np.searchsorted(keys, batch_keys, side="left")
            hi = np.searchsorted(keys, batch_keys, side="right")
            counts = hi - lo
            rows = np.repeat(np.arange(len(batch_keys)), counts)
            # the matching entries lo..hi-1 of each row, flattened: lo repeated, plus 0, 1, ... within a row
            within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
            targets = shard_of[np.repeat(lo, counts) + within]
            for k in np.unique(targets):
                rows_k = batch.take(pa.array(rows[targets == k]))
                writers[k].write_table(pa.Table.from_batches([rows_k], schema))
    finally:
        for w in writers:
            w.close()
    return paths


def publish_spill(path: str, folder: str) -> str:
    uri = storage.join(folder, BUILD_DIR, os.path.basename(path))
    storage.move_in(path, uri)
    return uri


# ---------------------------------------------------------------- one shard (any engine)


def build_shard(task: ShardTask, trained: bytes, queries: np.ndarray) -> ShardResult:
    """Add the shard's rows into a copy of the trained index; commit its faiss file, sorted ids,
    metadata and float16 store. Pure in its inputs: a retry writes the same bytes to the same names."""
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    truth = ExactTopK(queries, TOP_K)
    scratch = scratch_dir(task.folder, task.k)
    try:
        ids, meta = [], []
        raw = os.path.join(scratch, "vectors.f16")
        with open(raw, "wb") as f16:
            for batch in piece_batches(task.pieces, [*META_COLUMNS, "embedding"]):
                vectors = runsmod.embeddings(batch, task.dim)
                batch_ids = batch.column(0).to_numpy()
                with gpu.gpu_quantizer(index, task.use_gpu):
                    index.add_with_ids(vectors, batch_ids)
                truth.update(vectors, batch_ids)
                ids.append(batch_ids)
                meta.append(pa.Table.from_batches([batch.drop_columns(["embedding"])]))
                if task.rerank:
                    f16.write(vectors.astype(np.float16).tobytes())
        entry = write_shard_files(scratch, task, index, np.concatenate(ids), pa.concat_tables(meta), raw)
        commit_files(scratch, task.folder, entry)
        checkpoint("index.shard_written")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ShardResult(entry, truth.scores, truth.ids)


def piece_batches(pieces: list[Piece], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The pieces' rows, in order, as record batches."""
    for piece in pieces:
        start = 0
        for batch in runsmod.iter_batches(piece.shard, columns):
            lo, hi = np.searchsorted(piece.rows, [start, start + batch.num_rows])
            if hi > lo:
                yield batch.take(pa.array(piece.rows[lo:hi] - start))
            start += batch.num_rows
            if hi == len(piece.rows):
                break


def scratch_dir(folder: str, k: int) -> str:
    """Where a shard's files are written before their commit: beside the bundle when it is local
    (so the commit is a rename), else a local temporary folder (the commit is an upload)."""
    if storage.is_local(folder):
        path = storage.url_to_fs(folder)[1]
        os.makedirs(path, exist_ok=True)
        return tempfile.mkdtemp(prefix=f".shard-{k}{storage.TMP_MARK}", dir=path)
    return tempfile.mkdtemp(prefix=f"faceaudit-shard-{k}-")


def write_shard_files(
    scratch: str, task: ShardTask, index: faiss.Index, ids: np.ndarray, meta: pa.Table, raw_f16: str
) -> dict:
    """Shard k's files in ``scratch``: the FAISS index (in RAM or on-disk lists), sorted ids,
    metadata and the float16 store; returns the shard's manifest entry."""
    k = task.k
    os.makedirs(os.path.join(scratch, "metadata"), exist_ok=True)
    os.makedirs(os.path.join(scratch, "store"), exist_ok=True)
    order = np.argsort(ids, kind="stable")
    entry: dict = {"shard": k, "ntotal": int(len(ids))}
    entry.update(write_faiss(scratch, k, index, task.on_disk))
    name = f"store/ids-{k}.npy"
    np.save(os.path.join(scratch, name), ids[order])
    entry["ids"] = bundle.file_entry(scratch, name)
    found = read_occurrences(task.occurrences, meta.column("image_sha256"))
    entry["metadata"] = write_metadata(scratch, k, meta.take(pa.array(order)), found)
    if task.rerank:
        entry["vectors"] = write_f16_sorted(scratch, k, raw_f16, order, task.dim)
    return entry


def commit_files(scratch: str, folder: str, entry: dict) -> None:
    """Move each written file into the version folder whole: a rename locally, one upload on GCS."""
    for item in bundle.bundle_files({"shards": [entry]}):
        storage.move_in(os.path.join(scratch, item["file"]), storage.join(folder, item["file"]))


def write_faiss(staging: str, k: int, index: faiss.Index, on_disk: bool) -> dict:
    name = f"shard-{k}.faissindex"
    path = os.path.join(staging, name)
    out: dict = {}
    if on_disk:
        ivfdata = f"shard-{k}.ivfdata"
        move_to_ondisk(index, os.path.join(staging, ivfdata))
        faiss.write_index(index, path)
        out["ivfdata"] = bundle.file_entry(staging, ivfdata)
    else:
        faiss.write_index(index, path)
    out["index"] = bundle.file_entry(staging, name)
    return out


def move_to_ondisk(index: faiss.Index, ivfdata_path: str) -> None:
    """Replace the in-RAM inverted lists by OnDiskInvertedLists in ``ivfdata_path`` (as merge_ondisk)."""
    ivf = faiss.extract_index_ivf(index)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata_path)
    sources = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]
    sources.push_back(ivf.invlists)
    ondisk.merge_from_multiple(sources.data(), sources.size(), False)
    # the index file records this name; readers open it beside the index (IO_FLAG_ONDISK_SAME_DIR),
    # so keep only the base name: the file's bytes then do not depend on where it was built
    ondisk.filename = os.path.basename(ivfdata_path)
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # type: ignore[attr-defined]  # the index owns the lists now


def read_occurrences(uri: str, shas: pa.ChunkedArray) -> pa.Table:
    """Distinct (image_sha256, dataset, source_uri) of the shard's images, sorted, from its spill."""
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    table = table.filter(pc.is_in(table.column(0), value_set=pc.unique(shas)))
    found = table.group_by(OCCURRENCE_COLUMNS, use_threads=False).aggregate([])
    return found.sort_by([(c, "ascending") for c in OCCURRENCE_COLUMNS])


def write_metadata(staging: str, k: int, meta: pa.Table, found: pa.Table) -> dict:
    """face_id -> image, face, box, score and every occurrence of the image, sorted by face_id."""
    table = meta.drop_columns(["dataset", "source_uri"]).append_column(
        "occurrences", occurrence_lists(meta, found)
    )
    name = f"metadata/part-{k}.parquet"
    pq.write_table(table, os.path.join(staging, name), compression="zstd", row_group_size=METADATA_ROW_GROUP)
    entry = {**bundle.file_entry(staging, name), "rows": table.num_rows}
    return {**entry, "faces_per_dataset": faces_per_dataset(meta, found)}


def occurrence_lists(meta: pa.Table, found: pa.Table) -> pa.Array:
    """Per face row, the sorted occurrences of its image (its own row's when the images tables lack it)."""
    structs = pa.StructArray.from_arrays(
        [found.column("dataset").combine_chunks(), found.column("source_uri").combine_chunks()],
        fields=list(OCCURRENCE),
    )
    # ``found`` is sorted by sha: each run of equal shas is one image's list
    sha = found.column("image_sha256").combine_chunks()
    change = pc.not_equal(sha[1:], sha[:-1]).to_numpy(zero_copy_only=False) if len(sha) > 1 else []
    starts = np.concatenate([[0], np.flatnonzero(change) + 1]) if len(sha) else np.zeros(0, np.int64)
    offsets = pa.array(np.append(starts, len(sha)).astype(np.int32))
    grouped = pa.ListArray.from_arrays(offsets, structs)
    where = pc.index_in(meta.column("image_sha256"), value_set=sha.take(pa.array(starts)))
    if len(sha) and where.null_count == 0:
        return grouped.take(where)
    lists = grouped.take(pc.fill_null(where, 0)).to_pylist() if len(sha) else [None] * meta.num_rows
    missing = pc.is_null(where).to_pylist() if len(sha) else [True] * meta.num_rows
    own = zip(meta.column("dataset").to_pylist(), meta.column("source_uri").to_pylist(), strict=True)
    lists = [
        [{"dataset": d, "source_uri": u}] if gone else occ
        for occ, gone, (d, u) in zip(lists, missing, own, strict=True)
    ]
    return pa.array(lists, pa.list_(OCCURRENCE))


def faces_per_dataset(meta: pa.Table, found: pa.Table) -> dict[str, int]:
    """Faces whose image occurs at least once in each data set."""
    pairs = found.group_by(["image_sha256", "dataset"], use_threads=False).aggregate([])
    per_sha = meta.group_by("image_sha256", use_threads=False).aggregate([("face_id", "count")])
    where = pc.index_in(pairs.column("image_sha256"), value_set=per_sha.column("image_sha256"))
    counts = per_sha.column("face_id_count").combine_chunks().take(where)
    totals = (
        pa.table({"dataset": pairs.column("dataset"), "n": counts})
        .group_by("dataset")
        .aggregate([("n", "sum")])
    )
    return dict(
        sorted(zip(totals.column("dataset").to_pylist(), totals.column("n_sum").to_pylist(), strict=True))
    )


def write_f16_sorted(staging: str, k: int, raw: str, order: np.ndarray, dim: int) -> dict:
    """Rewrite the add-order float16 rows in face_id order, chunk by chunk through memory maps."""
    src = np.memmap(raw, dtype=np.float16, mode="r", shape=(len(order), dim))
    name = f"store/vectors-{k}.npy"
    dst = np.lib.format.open_memmap(
        os.path.join(staging, name), mode="w+", dtype=np.float16, shape=(len(order), dim)
    )
    step = 65_536
    for lo in range(0, len(order), step):
        dst[lo : lo + step] = src[order[lo : lo + step]]
    dst.flush()
    del dst, src
    return bundle.file_entry(staging, name)


# ---------------------------------------------------------------- driver: recall and manifest


def merged_top_k(queries: np.ndarray, results: list[ShardResult]) -> ExactTopK:
    """The shards' exact top-k merged in shard order (ties keep the earlier shard, as one pass would)."""
    truth = ExactTopK(queries, TOP_K)
    for r in results:
        truth.scores, truth.ids = merge_topk([truth.scores, r.scores], [truth.ids, r.ids], TOP_K)
    return truth


def measure_recall(
    folder: str,
    shards: list[dict],
    plan: IndexPlan,
    opts: BuildOptions,
    queries,
    query_ids,
    truth: ExactTopK,
    model_id: str,
    dim: int,
) -> RecallReport:
    """Tune nprobe (and, for PQ, the re-rank depth) on the written shards so held-out recall@10 reaches
    the target."""
    draft = {
        "dim": dim,
        "model_id": model_id,
        "shards": shards,
        "nprobe": None,
        "rerank_factor": opts.rerank_factor if plan.rerank else 1,
        "version": folder.rsplit("/", 1)[-1],
    }
    with tempfile.TemporaryDirectory(prefix="faceaudit-recall-") as cache:
        local = bundle.local_copy(folder, draft, cache)  # the folder itself when it is local
        index = Index(draft, local)
        try:
            exact10 = drop_self(truth.ids, query_ids, 10)

            def search(x, k, nprobe, factor=None):
                return index.search_ids(x, k, nprobe, factor)[1]

            if plan.nlist and plan.rerank:
                factors = rerank_factors(opts.rerank_factor, max(opts.rerank_factor, opts.max_rerank_factor))
                return tune_nprobe_and_depth(
                    search, queries, query_ids, exact10, plan.nlist, opts.target_recall, factors
                )
            if plan.nlist:
                return tune_nprobe(search, queries, query_ids, exact10, plan.nlist, opts.target_recall)
            r1, r10, _ = measure(search, queries, query_ids, exact10, None)
            return RecallReport(None, r1, r10, len(queries), [])
        finally:
            index.close()


def manifest_body(
    runs: list[Run],
    inputs: Inputs,
    plan: IndexPlan,
    opts: BuildOptions,
    shards: list[dict],
    report: RecallReport,
    model_id: str,
    dim: int,
) -> dict:
    model = runs[0].manifest
    return {
        "format": bundle.FORMAT,
        "model_id": model_id,
        "dim": dim,
        "metric": "inner_product",
        "match_threshold": float(model["match_threshold"]),
        "model": model.get("model", {}),
        "factory": plan.factory,
        "plan": asdict(plan),
        "nprobe": report.nprobe,
        "rerank_factor": report.rerank_factor,
        "on_disk": opts.on_disk,
        "recall": {
            "target": opts.target_recall,
            "at_1": report.recall_at_1,
            "at_10": report.recall_at_10,
            "queries": report.queries,
            "nprobe": report.nprobe,
            "tried": report.tried,
            "how": "held-out faces of the collection as queries, each query's own face left out",
        },
        "counts": {
            "input_rows": inputs.rows,
            "faces": inputs.unique,
            "duplicates": inputs.rows - inputs.unique - inputs.erased,
            **({"erased": inputs.erased} if inputs.erased else {}),
        },  # faces an erasure log names
        "datasets": dataset_summary(runs, shards),
        "runs": [{"run_id": r.run_id, "uri": r.uri, "manifest_sha256": r.manifest_sha256} for r in runs],
        "shards": shards,
        "seed": opts.seed,
    }


def dataset_summary(runs: list[Run], shards: list[dict]) -> list[dict]:
    """Per data set: its versions, images (occurrence rows, any status) and indexed faces seen there."""
    images = runsmod.image_counts(runs)
    faces: dict[str, int] = {}
    for shard in shards:
        for name, count in shard["metadata"]["faces_per_dataset"].items():
            faces[name] = faces.get(name, 0) + count
    return [
        {**d, "images": images.get(d["name"], 0), "faces": faces.get(d["name"], 0)}
        for d in runsmod.dataset_versions(runs)
    ]


def input_digest(runs: list[Run], opts: BuildOptions) -> str:
    payload = json.dumps([[r.manifest_sha256 for r in runs], asdict(opts)], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
