"""Build the next index version for ``faceaudit rebuild``: from a scope of live data sets, extending
the previous version's trained index when the new collection fits it, retraining otherwise.

"Extending" reuses what is expensive to make: the previous version's trained, empty index (its
coarse quantizer and PQ codebooks). Every live vector is then added into copies of it by the same
per-shard function as a full build (``shard.build_shard``), because a version also drops faces
(removed data sets) and rewrites occurrences, which an append-only update could not. It is
retrained instead when

* there is no previous version, it holds another model, or another kind of index fits now
  (e.g. the collection outgrew exact search, or the memory budget changed);
* the collection grew past ``growth_factor`` times the size the index was trained for;
* the extended version's recall@10 on held-out faces falls below the target.

The scope (``live``: run_id -> data sets whose occurrences count) restricts what is read: only
those data sets' ``images`` shards give occurrences, and a face is indexed only when its image has
at least one live occurrence. Faces of removed data sets thus vanish, also from runs that are kept
for the faces of other data sets.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace

import faiss
import numpy as np

from pipelines.core import erasure, orphans, storage
from pipelines.core.errors import ConfigError

from . import build, bundle, gc, gpu
from . import runs as runsmod
from .inputs import Inputs, read_positions, scan_ids, train
from .options import BuildOptions
from .params import IndexPlan, choose_plan
from .runs import Run
from .shard import ShardRunner, run_local

SHARD_NAME = re.compile(r"^part-(?P<dataset>.+)-(?P<unit>\d{6,})\.parquet$")  # part-<dataset>-<unit>


@dataclass(slots=True)
class VersionOptions:
    build: BuildOptions = field(default_factory=BuildOptions)
    growth_factor: float = 2.0  # retrain once the collection is this many times the trained size


@dataclass(slots=True)
class Decision:
    mode: str  # "extend" | "retrain"
    reason: str


@dataclass(slots=True)
class VersionResult:
    folder: str
    version: str
    manifest: dict
    decision: Decision
    seconds: float
    attempts: list[dict] = field(default_factory=list)  # each try: mode, reason, recall@10
    erasures: tuple[str, ...] = ()  # the erasure log entries the version honours (erase.catch_up)


# ---------------------------------------------------------------- scope


def shard_dataset(uri: str) -> str | None:
    """The data set a run shard belongs to, from its name (``part-<dataset>-<unit>.parquet``)."""
    match = SHARD_NAME.match(uri.rsplit("/", 1)[-1])
    return match.group("dataset") if match else None


def restrict(run: Run, datasets: set[str]) -> Run:
    """The run as the scope sees it: only the live data sets' occurrences and counts (faces stay:
    a live image's faces may have been written by an occurrence in a removed data set)."""
    manifest = dict(run.manifest)
    manifest["datasets"] = [d for d in run.manifest.get("datasets", []) if d["name"] in datasets]
    counts = dict(manifest.get("counts", {}))
    counts["per_dataset"] = {k: v for k, v in counts.get("per_dataset", {}).items() if k in datasets}
    manifest["counts"] = counts
    images = [s for s in run.images if shard_dataset(s.uri) in datasets]
    return Run(run.uri, manifest, run.manifest_sha256, list(run.faces), images)


def live_keys(runs: list[Run]) -> np.ndarray:
    """64 bits of the sha256 of every image with a live occurrence, sorted and distinct."""
    keys = [np.zeros(0, np.uint64)]
    for batch in runsmod.image_batches(runs, ["image_sha256"]):
        column = batch.column(0).drop_null()
        keys.append(runsmod.sha_keys(column, "an images shard"))
    return np.unique(np.concatenate(keys))


def scoped_inputs(
    runs: list[Run], model_id: str, erased: erasure.ErasureSet = erasure.EMPTY
) -> tuple[list[Run], Inputs]:
    """Scan faces, keep rows whose image is live, and drop runs that then give nothing."""
    inputs = scan_ids(runs, model_id, erased)  # faces an erasure log names never come back
    alive = live_keys(runs)
    keep = [k & np.isin(keys, alive) for k, keys in zip(inputs.keep, inputs.keys, strict=True)]
    kept_runs, shards, masks, keys = [], [], [], []
    for run in runs:
        mine = [i for i, s in enumerate(inputs.shards) if s in run.faces]
        if not run.images and not any(keep[i].any() for i in mine):
            continue  # neither live occurrences nor faces of a live image
        kept_runs.append(run)
        shards += [inputs.shards[i] for i in mine]
        masks += [keep[i] for i in mine]
        keys += [inputs.keys[i] for i in mine]
    rows = int(sum(len(m) for m in masks))
    return kept_runs, Inputs(shards, masks, keys, rows, inputs.erased)


# ---------------------------------------------------------------- extend or retrain


def decide(base: dict | None, plan: IndexPlan, model_id: str, n: int, opts: VersionOptions) -> Decision:
    """Extend the previous version's trained index, or retrain? (Recall is checked after an extend.)"""
    if base is None:
        return Decision("retrain", "no previous version")
    if base.get("model_id") != model_id:
        return Decision("retrain", f"the previous version holds {base.get('model_id')!r}")
    if base.get("on_disk") or opts.build.on_disk:
        return Decision("retrain", "on-disk inverted lists are rebuilt from a fresh index")
    old = base.get("plan", {})
    same = ("kind", "pq_m", "pq_bits", "opq", "rerank")
    if any(old.get(key) != getattr(plan, key) for key in same):
        return Decision("retrain", f"{plan.factory} fits the collection now, not {base.get('factory')}")
    trained_for = trained_size(base)
    if plan.kind != "flat" and n > opts.growth_factor * trained_for:
        return Decision(
            "retrain",
            f"{n} faces is more than {opts.growth_factor:g}x the {trained_for} the index was trained for",
        )
    return Decision("extend", f"{n} faces fit the index trained for {trained_for}")


def trained_size(base: dict | None) -> int:
    """The collection size the base version's index was trained for (carried through extends)."""
    assert base is not None
    return int((base.get("rebuild") or {}).get("trained_for") or base["counts"]["faces"])


def base_template(base: dict, base_folder: str) -> bytes:
    """The previous version's trained index, emptied, serialised (checked against its sha256 first)."""
    entry = base["shards"][0]["index"]
    with tempfile.TemporaryDirectory(prefix="faceaudit-base-") as tmp:
        local = os.path.join(tmp, "base.faissindex")
        storage.download(storage.join(base_folder, entry["file"]), local)
        bundle.verify(tmp, {"shards": [{"index": {**entry, "file": "base.faissindex"}}]})
        index = faiss.read_index(local)
    index.reset()  # keep the quantizer and codebooks, drop the vectors
    return faiss.serialize_index(index).tobytes()


def sample(inputs: Inputs, opts: BuildOptions, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out queries of a build that does not train (same seeded draw as ``inputs.train``)."""
    rng = np.random.default_rng(opts.seed)
    n = inputs.unique
    n_queries = min(opts.recall_queries, max(1, n // 10))
    positions = np.sort(rng.permutation(n)[:n_queries])
    return read_positions(inputs, positions, dim)


def build_version(
    runs: list[Run],
    live: dict[str, set[str]],
    out: str,
    opts: VersionOptions,
    base: dict | None = None,
    base_folder: str | None = None,
    runner: ShardRunner = run_local,
) -> VersionResult:
    """Write a new version under ``out`` (manifest included) without moving CURRENT; ``runner``
    adds the shards (here, or on Ray or Beam: ``runners.shard_runner``)."""
    started = time.time()
    scoped = [restrict(r, live.get(r.run_id, set())) for r in runs]
    model_id, dim = runsmod.check_same_model(scoped)
    erased = erasure.load(opts.build.erasure_log or erasure.default_log(out))
    scoped, inputs = scoped_inputs(scoped, model_id, erased)
    if inputs.unique == 0:
        raise ConfigError("the registry's data sets hold no faces; nothing to index")
    b = opts.build
    plan = choose_plan(
        inputs.unique, dim, b.max_bytes_per_vector, b.opq, b.rerank, b.flat_max, b.nlist, b.on_disk
    )
    decision = decide(base, plan, model_id, inputs.unique, opts)
    if decision.mode == "extend":
        assert base is not None
        plan = replace(
            plan, **{k: v for k, v in base["plan"].items() if k in ("factory", "nlist", "train_size")}
        )
    version = bundle.fresh_version(out, build.input_digest(scoped, b))
    folder = storage.join(out, version)
    gc.clean_unpublished(out)  # a killed rebuild's version folder holds embeddings: gone before a new one
    attempts: list[dict] = []
    while True:
        watch = build.Stopwatch()
        with orphans.in_progress(folder):  # a concurrent index build or gc leaves a live rebuild alone
            body = _build_once(
                folder, scoped, inputs, plan, b, model_id, dim, decision, base, base_folder, runner, watch
            )
        attempts.append(
            {"mode": decision.mode, "reason": decision.reason, "recall_at_10": body["recall"]["at_10"]}
        )
        if decision.mode == "retrain" or body["recall"]["at_10"] >= b.target_recall:
            break
        storage.remove(folder)  # nothing points at it: no manifest yet
        decision = Decision(
            "retrain",
            f"the extended index reached recall@10 {body['recall']['at_10']:.3f}, "
            f"below the target {b.target_recall}",
        )
        plan = choose_plan(
            inputs.unique, dim, b.max_bytes_per_vector, b.opq, b.rerank, b.flat_max, b.nlist, b.on_disk
        )
    trained_for = inputs.unique if decision.mode == "retrain" else trained_size(base)
    body.update(
        version=version,
        created_at=build.iso_now(),
        build_seconds=round(time.time() - started, 1),
        built_on_gpu=gpu.wanted(b.use_gpu),
        build_phases=watch.laps,
        rebuild={
            "mode": decision.mode,
            "reason": decision.reason,
            "trained_for": trained_for,
            "base_version": base.get("version") if base else None,
            "attempts": attempts,
        },
    )
    seconds = time.time() - started
    return VersionResult(folder, version, body, decision, seconds, attempts, erased.entries)


def _build_once(
    folder: str,
    runs: list[Run],
    inputs: Inputs,
    plan: IndexPlan,
    opts: BuildOptions,
    model_id: str,
    dim: int,
    decision: Decision,
    base: dict | None,
    base_folder: str | None,
    runner: ShardRunner,
    watch: build.Stopwatch,
) -> dict:
    """One try: the trained index (fresh or the base's), the shards, recall; returns the manifest body."""
    use_gpu = gpu.wanted(opts.use_gpu)
    if decision.mode == "extend":
        assert base is not None and base_folder is not None
        queries, query_ids = sample(inputs, opts, dim)
        trained = base_template(base, base_folder)
    else:
        queries, query_ids, trained = train(inputs, plan, opts, use_gpu, dim)
    watch.lap("train")
    drawn = build.Sample(queries, query_ids, trained)
    return build.add_shards(folder, runs, inputs, plan, opts, use_gpu, model_id, dim, drawn, runner, watch)


def write_manifest(out: str, version: str, body: dict) -> None:
    """Commit the version (manifest last, create-only) without moving CURRENT: the rebuild checks it first."""
    storage.write_atomic(storage.join(out, version, bundle.MANIFEST), bundle.seal(body), create_only=True)


def discard(folder: str) -> None:
    """Remove a version folder that never became CURRENT (a failed check)."""
    storage.remove(folder)
    if storage.is_local(folder):
        shutil.rmtree(storage.url_to_fs(folder)[1], ignore_errors=True)
