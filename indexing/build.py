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
import tempfile
import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from pipelines.core import erasure, orphans, storage
from pipelines.core.errors import ConfigError
from pipelines.core.faults import checkpoint
from pipelines.core.locks import sweep_lock

from . import bundle, copies, download, erase, gc, gpu, lookup
from . import runs as runsmod
from .bundle import BUILD_DIR
from .inputs import Inputs, pieces_for, scan_ids, shard_bounds, train
from .occurrences import spill_occurrences
from .options import BuildOptions
from .params import IndexPlan, choose_plan
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
from .runs import Run
from .search import Index
from .shard import TOP_K, ShardResult, ShardRunner, ShardTask, run_local


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
    with sweep_lock(out, holder="an index build"):  # an erasure sweep rewrites runs we read
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
    gc.clean_unpublished(out)  # what killed builds left (it holds embeddings)
    with orphans.in_progress(folder):  # the next build and `faceaudit gc` leave a live build alone
        sample = Sample(*train(inputs, plan, opts, use_gpu, dim))
        watch.lap("train")
        body = add_shards(
            folder, runs, inputs, plan, opts, use_gpu, model_id, dim, sample, runner or run_local, watch
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


@dataclass(slots=True)
class Sample:
    """The held-out queries, their face_ids and the trained empty index (serialised)."""

    queries: np.ndarray
    query_ids: np.ndarray
    trained: bytes


def add_shards(
    folder: str,
    runs: list[Run],
    inputs: Inputs,
    plan: IndexPlan,
    opts: BuildOptions,
    use_gpu: bool,
    model_id: str,
    dim: int,
    sample: Sample,
    runner: ShardRunner,
    watch: Stopwatch,
) -> dict:
    """Route the occurrences, add every shard on ``runner``, tune nprobe; the manifest's body.
    A full build and a rebuild's extension share it."""
    bounds = shard_bounds(inputs.unique, opts.vectors_per_shard)
    spills = spill_occurrences(runs, inputs, bounds, folder)
    watch.lap("route_occurrences")
    tasks = [
        ShardTask(k, folder, pieces_for(inputs, lo, hi), spills[k], plan.rerank, opts.on_disk, dim, use_gpu)
        for k, (lo, hi) in enumerate(bounds)
    ]
    results = runner(tasks, sample.trained, sample.queries)
    watch.lap("add_shards")
    storage.remove(storage.join(folder, BUILD_DIR))
    shards = [r.entry for r in results]
    lookup.add_tables(folder, shards)  # the range look-up's hash tables, beside the metadata
    watch.lap("range_tables")
    # every image the runs hold, faces or not, grouped with its near-duplicates by PDQ
    found = copies.write_copies(
        folder, runs, erasure.load(opts.erasure_log or erasure.default_log(bundle.root_of(folder)))
    )
    watch.lap("copies")
    truth = merged_top_k(sample.queries, results)
    report = measure_recall(
        folder, shards, plan, opts, sample.queries, sample.query_ids, truth, model_id, dim
    )
    watch.lap("tune_nprobe")
    return {**manifest_body(runs, inputs, plan, opts, shards, report, model_id, dim), "copies": found}


def commit_bundle(out: str, version: str, body: dict, honoured: tuple[str, ...], log_uri: str) -> None:
    """The shards are committed already: write the manifest last (create-only), then move CURRENT,
    once any erasure logged since the scan (``honoured``: the entries it read) is swept from it."""
    checkpoint("index.before_manifest")
    storage.write_atomic(storage.join(out, version, bundle.MANIFEST), bundle.seal(body), create_only=True)
    erase.catch_up(out, honoured, log_uri, body)
    checkpoint("index.before_current")
    bundle.move_current(out, version)


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
        local = download.local_copy(folder, draft, cache)  # the folder itself when it is local
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
    payload = json.dumps([[r.manifest_sha256 for r in runs], opts.model_dump()], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
