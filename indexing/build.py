"""``build_index``: committed runs in, a verified index bundle out (after autofaiss's distributed build).

Passes over the faces shards, each reading record batches (memory bounded by a batch and one
output shard, never the collection):

1. face_id column only: check every shard's sha256 and model, and find each face_id's first row
   (duplicates across runs are dropped).
2. embeddings of a seeded random sample: the training set and disjoint held-out queries.
3. train once, then add every kept row, batch by batch, into a copy of the trained index with its
   global face_id; each copy becomes one bundle shard once it holds ``vectors_per_shard``. The same
   pass keeps the exact top-k of the held-out queries for the recall measurement.

Then nprobe is tuned on the written shards against that exact top-k, the manifest is written last
and CURRENT moved.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import storage
from pipelines.core.errors import ConfigError

from . import bundle, gpu
from . import runs as runsmod
from .params import FLAT_MAX, IndexPlan, choose_plan
from .recall import ExactTopK, RecallReport, drop_self, measure, tune_nprobe
from .runs import META_COLUMNS, Run, Shard
from .search import Index

METADATA_ROW_GROUP = 4096
KMEANS_ITERATIONS = 10
OCCURRENCE = pa.struct([("dataset", pa.string()), ("source_uri", pa.string())])


@dataclass(slots=True)
class BuildOptions:
    """How to build; every field has a CLI flag of the same name."""

    max_bytes_per_vector: int | None = None  # RAM per vector (codes + id); None: no budget
    opq: bool = False
    rerank: bool = True  # exact re-ranking from an on-disk float16 store (PQ only)
    rerank_factor: int = 10  # candidates per wanted hit that are re-ranked
    on_disk: bool = False  # inverted lists in a memory-mapped .ivfdata file (IVF only)
    target_recall: float = 0.95
    vectors_per_shard: int = 1_000_000
    recall_queries: int = 1000
    seed: int = 1234
    use_gpu: bool | None = None  # None: when faiss sees one
    flat_max: int = FLAT_MAX
    nlist: int | None = None
    threads: int | None = None


@dataclass(slots=True)
class Inputs:
    """The faces shards in read order and, per shard, which rows survive de-duplication."""

    shards: list[Shard]
    keep: list[np.ndarray]
    rows: int

    @property
    def unique(self) -> int:
        return int(sum(int(k.sum()) for k in self.keep))


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


@dataclass(slots=True)
class ShardOut:
    """The rows added to the shard being filled."""

    index: faiss.Index
    ids: list[np.ndarray] = field(default_factory=list)
    meta: list[pa.Table] = field(default_factory=list)
    f16: BinaryIO | None = None  # float16 rows, in add order

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)


def build_index(run_uris: list[str], out: str, options: BuildOptions | None = None) -> BuildResult:
    opts = options or BuildOptions()
    started = time.time()
    if opts.threads:
        faiss.omp_set_num_threads(opts.threads)
    watch = Stopwatch()
    runs = runsmod.find_runs(run_uris)
    model_id, dim = runsmod.check_same_model(runs)
    inputs = scan_ids(runs, model_id)
    watch.lap("scan_ids")
    if inputs.unique == 0:
        raise ConfigError("the runs hold no faces; nothing to index")
    plan = choose_plan(inputs.unique, dim, opts.max_bytes_per_vector, opts.opq, opts.rerank,
                       opts.flat_max, opts.nlist, opts.on_disk)
    use_gpu = gpu.wanted(opts.use_gpu)
    version = bundle.new_version(input_digest(runs, opts))
    if storage.exists(storage.join(out, version, bundle.MANIFEST)):
        raise ConfigError(f"{storage.join(out, version)} already exists; build again in a second")
    with tempfile.TemporaryDirectory(prefix="faceaudit-index-") as tmp:
        staging = storage.url_to_fs(storage.join(out, version))[1] if storage.is_local(out) else tmp
        os.makedirs(os.path.join(staging, "metadata"), exist_ok=True)
        os.makedirs(os.path.join(staging, "store"), exist_ok=True)
        body = build_into(staging, runs, inputs, plan, opts, use_gpu, model_id, dim, watch)
        body.update(version=version, created_at=iso_now(), build_seconds=round(time.time() - started, 1),
                    built_on_gpu=use_gpu, build_phases=watch.laps)
        folder = bundle.publish(staging, out, version, body)
    return BuildResult(folder, version, body, time.time() - started)


def build_into(staging: str, runs: list[Run], inputs: Inputs, plan: IndexPlan, opts: BuildOptions,
               use_gpu: bool, model_id: str, dim: int, watch: Stopwatch) -> dict:
    rng = np.random.default_rng(opts.seed)
    n = inputs.unique
    n_queries = min(opts.recall_queries, max(1, n // 10))
    picks = rng.permutation(n)
    query_pos = np.sort(picks[:n_queries])
    train_pos = np.sort(picks[n_queries : n_queries + plan.train_size]) if plan.train_size else query_pos[:0]
    sample = read_positions(inputs, np.concatenate([query_pos, train_pos]), dim)
    queries, query_ids = sample[0][:n_queries], sample[1][:n_queries]
    watch.lap("read_sample")
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # k-means is most of a build's time; pin faiss 1.15's default of 10 iterations across versions
        ivf.cp.niter = KMEANS_ITERATIONS
    if not index.is_trained:
        gpu.train(index, sample[0][n_queries:], use_gpu)
    watch.lap("train")
    truth = ExactTopK(queries, 11)
    shards = add_all(staging, runs, inputs, index, plan, opts, truth, use_gpu, dim, watch)
    report = measure_recall(staging, shards, plan, opts, queries, query_ids, truth, model_id, dim)
    watch.lap("tune_nprobe")
    body = manifest_body(runs, inputs, plan, opts, shards, report, model_id, dim)
    watch.lap("summary")
    return body


def scan_ids(runs: list[Run], model_id: str) -> Inputs:
    """Pass 1: verify shards, read face_ids, keep each face_id's first row in run/shard order."""
    shards = [s for r in runs for s in r.faces]
    per_shard = []
    for shard in shards:
        runsmod.verify_shard(shard)
        ids = []
        for batch in runsmod.iter_batches(shard, ["face_id", "model_id"]):
            runsmod.check_batch_model(batch, model_id, shard)
            ids.append(batch.column(0).to_numpy())
        per_shard.append(np.concatenate(ids) if ids else np.zeros(0, np.int64))
    all_ids = np.concatenate(per_shard) if per_shard else np.zeros(0, np.int64)
    keep = np.zeros(len(all_ids), dtype=bool)
    keep[np.unique(all_ids, return_index=True)[1]] = True
    bounds = np.cumsum([0, *[len(a) for a in per_shard]])
    return Inputs(shards, [keep[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)], len(all_ids))


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


def add_all(staging: str, runs: list[Run], inputs: Inputs, trained: faiss.Index, plan: IndexPlan,
            opts: BuildOptions, truth: ExactTopK, use_gpu: bool, dim: int,
            watch: Stopwatch) -> list[dict]:
    """Pass 3: add every kept row into copies of the trained index, one copy per bundle shard."""
    template = faiss.serialize_index(trained)
    shards: list[dict] = []
    current: ShardOut | None = None
    for _, batch in kept_batches(inputs, [*META_COLUMNS, "embedding"]):
        if current is None:
            current = new_shard(template, staging, len(shards), plan)
        vectors = runsmod.embeddings(batch, dim)
        ids = batch.column(0).to_numpy()
        watch.lap("read")
        with gpu.gpu_quantizer(current.index, use_gpu):
            current.index.add_with_ids(vectors, ids)
        watch.lap("add")
        truth.update(vectors, ids)
        watch.lap("exact_top_k")
        current.ids.append(ids)
        current.meta.append(pa.Table.from_batches([batch.drop_columns(["embedding"])]))
        if current.f16 is not None:
            current.f16.write(vectors.astype(np.float16).tobytes())
        if current.ntotal >= opts.vectors_per_shard:
            shards.append(finish_shard(staging, len(shards), current, runs, opts, dim))
            current = None
        watch.lap("write_shards")
    if current is not None:
        shards.append(finish_shard(staging, len(shards), current, runs, opts, dim))
    watch.lap("write_shards")
    return shards


def new_shard(template, staging: str, k: int, plan: IndexPlan) -> ShardOut:
    out = ShardOut(faiss.deserialize_index(template))
    if plan.rerank:
        out.f16 = open(os.path.join(staging, "store", f".vectors-{k}.f16"), "wb")  # noqa: SIM115
    return out


def finish_shard(staging: str, k: int, shard: ShardOut, runs: list[Run], opts: BuildOptions,
                 dim: int) -> dict:
    """Write shard k: the FAISS index (in RAM or on-disk lists), sorted ids, metadata, f16 store."""
    ids = np.concatenate(shard.ids)
    order = np.argsort(ids, kind="stable")
    entry: dict = {"shard": k, "ntotal": int(len(ids))}
    entry.update(write_faiss(staging, k, shard.index, opts.on_disk))
    name = f"store/ids-{k}.npy"
    np.save(os.path.join(staging, name), ids[order])
    entry["ids"] = bundle.file_entry(staging, name)
    entry["metadata"] = write_metadata(staging, k, pa.concat_tables(shard.meta).take(pa.array(order)), runs)
    if shard.f16 is not None:
        shard.f16.close()
        entry["vectors"] = write_f16_sorted(staging, k, order, dim)
    return entry


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
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # type: ignore[attr-defined]  # the index owns the lists now


def write_metadata(staging: str, k: int, meta: pa.Table, runs: list[Run]) -> dict:
    """face_id -> image, face, box, score and every occurrence of the image, sorted by face_id."""
    found = runsmod.occurrences_for(runs, meta.column("image_sha256").unique())
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
    lists = [[{"dataset": d, "source_uri": u}] if gone else occ
             for occ, gone, (d, u) in zip(lists, missing, own, strict=True)]
    return pa.array(lists, pa.list_(OCCURRENCE))


def faces_per_dataset(meta: pa.Table, found: pa.Table) -> dict[str, int]:
    """Faces whose image occurs at least once in each data set."""
    pairs = found.group_by(["image_sha256", "dataset"], use_threads=False).aggregate([])
    per_sha = meta.group_by("image_sha256", use_threads=False).aggregate([("face_id", "count")])
    where = pc.index_in(pairs.column("image_sha256"), value_set=per_sha.column("image_sha256"))
    counts = per_sha.column("face_id_count").combine_chunks().take(where)
    totals = pa.table({"dataset": pairs.column("dataset"), "n": counts}).group_by("dataset").aggregate(
        [("n", "sum")])
    return dict(sorted(zip(totals.column("dataset").to_pylist(), totals.column("n_sum").to_pylist(),
                           strict=True)))


def write_f16_sorted(staging: str, k: int, order: np.ndarray, dim: int) -> dict:
    """Rewrite the add-order float16 rows in face_id order, chunk by chunk through memory maps."""
    raw = os.path.join(staging, "store", f".vectors-{k}.f16")
    src = np.memmap(raw, dtype=np.float16, mode="r", shape=(len(order), dim))
    name = f"store/vectors-{k}.npy"
    dst = np.lib.format.open_memmap(os.path.join(staging, name), mode="w+", dtype=np.float16,
                                    shape=(len(order), dim))
    step = 65_536
    for lo in range(0, len(order), step):
        dst[lo : lo + step] = src[order[lo : lo + step]]
    dst.flush()
    del dst, src
    os.unlink(raw)
    return bundle.file_entry(staging, name)


def measure_recall(staging: str, shards: list[dict], plan: IndexPlan, opts: BuildOptions, queries, query_ids,
                   truth: ExactTopK, model_id: str, dim: int) -> RecallReport:
    """Tune nprobe on the written shards so held-out recall@10 reaches the target."""
    draft = {"dim": dim, "model_id": model_id, "shards": shards, "nprobe": None,
             "rerank_factor": opts.rerank_factor if plan.rerank else 1}
    index = Index(draft, staging)
    try:
        exact10 = drop_self(truth.ids, query_ids, 10)

        def search(x, k, nprobe):
            return index.search_ids(x, k, nprobe)[1]

        if plan.nlist:
            return tune_nprobe(search, queries, query_ids, exact10, plan.nlist, opts.target_recall)
        r1, r10, _ = measure(search, queries, query_ids, exact10, None)
        return RecallReport(None, r1, r10, len(queries), [])
    finally:
        index.close()


def manifest_body(runs: list[Run], inputs: Inputs, plan: IndexPlan, opts: BuildOptions, shards: list[dict],
                  report: RecallReport, model_id: str, dim: int) -> dict:
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
        "rerank_factor": opts.rerank_factor if plan.rerank else 1,
        "on_disk": opts.on_disk,
        "recall": {"target": opts.target_recall, "at_1": report.recall_at_1, "at_10": report.recall_at_10,
                   "queries": report.queries, "nprobe": report.nprobe, "tried": report.tried,
                   "how": "held-out faces of the collection as queries, each query's own face left out"},
        "counts": {"input_rows": inputs.rows, "faces": inputs.unique,
                   "duplicates": inputs.rows - inputs.unique},
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
    return [{**d, "images": images.get(d["name"], 0), "faces": faces.get(d["name"], 0)}
            for d in runsmod.dataset_versions(runs)]


def input_digest(runs: list[Run], opts: BuildOptions) -> str:
    payload = json.dumps([[r.manifest_sha256 for r in runs], asdict(opts)], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
