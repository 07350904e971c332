"""The Ray engine: the core's stages on Ray Data, on a local Ray or a Ray cluster.

Two passes over the pending work units (see docs/engines.md):

1. hash: read tasks read and hash every unit; a group-by on the hash finds the images met more
   than once and their owner (``pipelines.core.dedup``). Up to DRIVER_GROUP_MAX occurrences the
   driver groups the (sha, order) rows itself; above, a Ray Data group-by does, and only the
   duplicates reach the driver. A run of local files up to ``ray.driver_hash_max`` occurrences
   is read and hashed by the driver itself: starting read tasks costs more than that.
2. analyse: each unit is read again (by the actor itself when the sources are local files, else by
   read tasks) keeping the bytes of the images it owns -> an actor pool (the model loaded once
   per actor; CPUs, GPUs and pool size from ``job.ray``) decodes, detects and embeds, then writes
   the unit's faces then images shard atomically.
   A unit whose duplicates are owned by a later-finishing unit waits (in the object store) for
   their results and commits last.

Rows are whole units (one unit per block), so each actor call analyses one unit and commits
stream out as units finish; Ray Data's backpressure bounds what is in flight. An actor that
dies is restarted and its unit retried; commits are whole-file renames of identical content, so
a retry never duplicates output. The driver writes the manifest last with ``finish_run``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import pickle
from collections.abc import Iterable
from typing import Any

from ..core import storage
from ..core.config import DecodeConfig, HttpConfig, JobConfig, ModelConfig, RayConfig
from ..core.dedup import (
    Duplicate,
    PlannedUnit,
    UnitTask,
    UnitWork,
    commit_unit,
    committed_results,
    duplicates,
    exported_results,
    foreign_owners,
    known_owners,
    merge_tallies,
    plan_order,
    read_for_analysis,
    read_occurrences,
    unit_tasks,
)
from ..core.errors import FatalError
from ..core.faults import checkpoint, ray_options
from ..core.isolate import IsolatedPool, limits_for, resolve_batch
from ..core.models import load_model
from ..core.records import ImageResult, WorkUnit
from ..core.run import (
    RunSummary,
    Tally,
    finish_run,
    hold_run,
    read_manifest,
)
from ..core.stages import analyze_batch
from ..core.worker import analyze, init_worker
from .common import ModelInfo, default_batch_size, describe_model, manifest_header, require, worker_model

log = logging.getLogger(__name__)

MAX_BLOCKS = 10_000  # one unit per block up to this many units (a block is one actor call)
DRIVER_GROUP_MAX = 1_000_000  # occurrences whose hashes (40 bytes each) the driver groups itself
SUMMARY = ("tally", "exports", "analyzed", "waiting")  # an analysed unit's row, less its deferred work


def run_job(
    job: JobConfig, known: dict[str, ImageResult] | None = None, known_from: list[str] | None = None
) -> RunSummary:
    """Run (or resume) an ingest job on Ray; returns the committed run's manifest.

    ``known`` and ``known_from`` as for the local engine: images whose faces earlier runs committed
    get ``images`` rows here without being decoded or embedded again.
    """
    started = dt.datetime.now(dt.timezone.utc)
    with hold_run(job) as state:  # the driver is the run's one writer until the block ends
        run_id, uri = state.run_id, state.uri
        if state.committed:
            return RunSummary(run_id, uri, read_manifest(uri))
        ray = require("ray", "ray")
        connected_here = _connect(ray, job)
        try:
            _quiet(job.progress)
            describing = _describe(ray, job)  # the model loads on a worker while units are hashed
            units = plan_order(job, state)
            dups, committed = _find_duplicates(units, job, state.uri, known or {})
            info = _described(ray, describing)
            tasks = unit_tasks(units, dups)
            run = _Run(job, run_id, state.uri, info)
            tally, analyzed = run.process(tasks, committed)
        finally:
            if connected_here:
                ray.shutdown()
        tally.check_end(job.max_error_fraction, job.min_images_for_budget)
        known_runs = None if known is None else known_from or []
        body = finish_run(state, manifest_header(job, run_id, "ray", info, started, known_runs))
    elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    return RunSummary(run_id, uri, body, len(state.done), elapsed, analyzed)


def _connect(ray, job: JobConfig) -> bool:
    """Join the configured cluster (or RAY_ADDRESS), else start a local Ray. True if started here."""
    if ray.is_initialized():
        return False
    address = job.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=job.workers or None, include_dashboard=False)
    return True


def _quiet(progress: bool) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _describe(ray, job: JobConfig):
    """Start loading the model once on a worker with the actors' resources (``_described`` waits
    for it): a model that will not load fails the job with load_model's message after the hash
    pass, which only reads, and before any unit is analysed or committed."""
    remote = ray.remote(describe_model).options(
        num_cpus=job.ray.actor_cpus, num_gpus=job.ray.actor_gpus, max_retries=0
    )
    return remote.remote(job.model)


def _described(ray, describing) -> ModelInfo:
    try:
        return ray.get(describing)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, FatalError):
            raise FatalError(str(exc.cause)) from None
        raise


# ---------------------------------------------------------------- pass 1: hash


def _find_duplicates(
    units: list[PlannedUnit], job: JobConfig, run: str, known: dict[str, ImageResult]
) -> tuple[list[Duplicate], dict[int, ImageResult]]:
    """Pending occurrences met before in the run (or known from earlier runs), and the committed
    results of owners in done units (or known)."""
    pending = [p for p in units if not p.done]
    if not pending:
        return [], {}
    if _hash_in_driver(pending, job.ray):
        found = _group_in_driver(_driver_rows(units, job, run, known))
    else:
        found = _distributed_duplicates(units, job, run, known)
    dups = [Duplicate(r["order"], r["owner"]) for r in found]
    committed = {r["owner"]: pickle.loads(r["owner_result"]) for r in found if r["owner_result"]}
    return dups, committed


def _hash_in_driver(pending: list[PlannedUnit], cfg: RayConfig) -> bool:
    """Whether the driver reads and hashes the pending units itself: local files, few enough.
    Ray Data's read tasks cost seconds to start (a worker process each) for what the driver reads
    and hashes in a fraction of one on a small run. A tar or a line-record file's unit counts its
    images only once read (``WorkUnit.size`` None): such a run is always hashed by read tasks, so
    that a TSV of millions of rows (one file, one item) never lands on the driver."""
    sizes = [p.unit.size for p in pending]
    if any(size is None for size in sizes):
        return False
    return sum(size or 0 for size in sizes) <= cfg.driver_hash_max and _all_local([p.unit for p in pending])


def _driver_rows(units: list[PlannedUnit], job: JobConfig, run: str, known: dict[str, ImageResult]):
    """The hash pass's rows, made in the driver."""
    for planned in units:
        yield from _committed_rows_of(planned, run) if planned.done else _hash_rows_of(planned, job)
    for order, sha, result in known_owners(known):
        yield {"sha": sha, "order": order, "result": pickle.dumps(result)}


def _distributed_duplicates(
    units: list[PlannedUnit], job: JobConfig, run: str, known: dict[str, ImageResult]
) -> list[dict]:
    """The hash pass on Ray Data: read tasks read and hash the pending units."""
    import ray.data

    pending = [p for p in units if not p.done]
    rows = _items(pending).flat_map(_hash_rows, fn_kwargs={"job": job}, num_cpus=max(job.ray.read_cpus, 1.0))
    done = [p for p in units if p.done]
    if done:
        rows = rows.union(_items(done).flat_map(_committed_rows, fn_kwargs={"run": run}))
    if known:
        owners = [{"sha": s, "order": o, "result": pickle.dumps(r)} for o, s, r in known_owners(known)]
        rows = rows.union(ray.data.from_items(owners))
    if sum(len(p.unit.items) for p in units) + len(known) <= DRIVER_GROUP_MAX:
        return _group_in_driver(rows.iter_rows())
    # a few partitions for a small run: each partition is a task, and 200 idle tasks cost seconds
    partitions = max(1, min(200, len(units) // 64))
    found = rows.groupby("sha", num_partitions=partitions).map_groups(_owner_rows, batch_format="pyarrow")
    return found.take_all()


def _group_in_driver(rows: Iterable[dict]) -> list[dict]:
    """The group-by of ``_find_duplicates`` for a run small enough that its hashes fit the driver:
    the distributed group-by starts shuffle actors (a process each), which on a small machine
    costs more than the hashes' 40 bytes per image here."""
    import pyarrow as pa

    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["sha"], []).append(row)
    found: list[dict] = []
    for group in groups.values():
        if len(group) > 1:
            table = pa.table({key: [r[key] for r in group] for key in ("order", "result")})
            found += _owner_rows(table).to_pylist()
    return found


def _items(objects: Iterable[Any]):
    import ray.data

    items = [{"item": pickle.dumps(obj)} for obj in objects]
    return ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))


def _hash_rows(row: dict, job: JobConfig) -> list[dict]:
    return _hash_rows_of(pickle.loads(row["item"]), job)


def _hash_rows_of(planned: PlannedUnit, job: JobConfig) -> list[dict]:
    return [
        {"sha": occ.sha, "order": occ.order, "result": b""}
        for occ in read_occurrences(planned, job.http)
        if occ.sha is not None
    ]


def _committed_rows(row: dict, run: str) -> list[dict]:
    return _committed_rows_of(pickle.loads(row["item"]), run)


def _committed_rows_of(planned: PlannedUnit, run: str) -> list[dict]:
    return [
        {"sha": sha, "order": order, "result": pickle.dumps(result)}
        for order, sha, result in committed_results(run, planned)
    ]


def _owner_rows(group):
    """One image's occurrences -> a row per pending non-owner: its order, its owner's order, and
    the owner's committed result when the owner is in a done unit."""
    import pyarrow as pa

    orders = group.column("order").to_pylist()
    results = dict(zip(orders, group.column("result").to_pylist(), strict=True))
    dups = [d for d in duplicates(orders) if not results[d.order]] if len(orders) > 1 else []
    return pa.table(
        {
            "order": pa.array([d.order for d in dups], pa.int64()),
            "owner": pa.array([d.owner for d in dups], pa.int64()),
            "owner_result": pa.array([results[d.owner] for d in dups], pa.binary()),
        }
    )


# ---------------------------------------------------------------- pass 2: analyse and commit


class _Run:
    def __init__(self, job: JobConfig, run_id: str, run: str, info: ModelInfo):
        self.job, self.run_id, self.run, self.info = job, run_id, run, info
        self.budget = None  # the Budget actor, while process() runs

    def process(self, tasks: list[UnitTask], committed: dict[int, ImageResult]) -> tuple[Tally, int]:
        if not tasks:
            return Tally(), 0
        import ray

        job = self.job
        budget = ray.remote(Budget).options(num_cpus=0, **ray_options())
        self.budget = budget.remote(job.max_error_fraction, job.min_images_for_budget)
        try:
            return self._process(tasks, committed)
        except Exception as exc:
            verdict = _verdict(self.budget)
            if verdict is None:
                raise
            raise FatalError(verdict) from exc  # the budget actor's message, not Ray's wrapping
        finally:
            ray.kill(self.budget)

    def _process(self, tasks: list[UnitTask], committed: dict[int, ImageResult]) -> tuple[Tally, int]:
        out = self._pipeline(tasks, committed).materialize()
        # Read from the materialised blocks: select_columns(...).take_all() ran a new pass of
        # tasks over them, which cost 3 s on 2 CPUs.
        summaries = [{k: row[k] for k in SUMMARY} for row in out.iter_rows()]
        foreign = dict(committed)
        for s in summaries:
            foreign.update(pickle.loads(s["exports"]))
        tallies = [pickle.loads(s["tally"]) for s in summaries]
        if any(s["waiting"] for s in summaries):
            from ray.data.expressions import col

            waiting = out.filter(expr=col("waiting"))
            done = waiting.map(_commit_deferred, fn_kwargs=self._commit_kwargs(foreign), **ray_options())
            tallies += [pickle.loads(r["tally"]) for r in done.select_columns(["tally"]).take_all()]
        return merge_tallies(tallies), sum(s["analyzed"] for s in summaries)

    def _pipeline(self, tasks: list[UnitTask], committed: dict[int, ImageResult]):
        import ray.data

        cfg = self.job.ray
        pool = _pool_size(cfg, len(tasks))
        ds = _items(tasks)
        if not _all_local([t.planned.unit for t in tasks]):
            # Remote sources: read tasks keep the actors busy while units download. Units in
            # flight are bounded: two read per actor, two queued at each actor.
            ds = ds.map(
                _read_row,
                fn_kwargs={"job": self.job},
                num_cpus=cfg.read_cpus,
                concurrency=2 * pool,
                **ray_options(),
            )
        # Local sources: each actor reads its own units. Reading a local unit is quick, a read
        # stage costs a worker process per concurrent read task (about 2 CPU seconds each to
        # start), and the bytes then skip the object store.
        return ds.map(
            Analyzer,
            fn_constructor_kwargs={
                "model": worker_model(self.job.model, cfg.actor_cpus),
                "decode": self.job.decode,
                "http": self.job.http,
                "batch_size": default_batch_size(self.job.model, cfg.batch_size),
                "commit": self._commit_kwargs(committed),
            },
            compute=ray.data.ActorPoolStrategy(size=pool, max_tasks_in_flight_per_actor=2),
            num_cpus=cfg.actor_cpus,
            num_gpus=cfg.actor_gpus,
            **ray_options(),  # kill points, for tests
        )

    def _commit_kwargs(self, foreign: dict[int, ImageResult]) -> dict:
        return {
            "run": self.run,
            "run_id": self.run_id,
            "info": self.info,
            "foreign": foreign,
            "budget": self.budget,
        }


class Budget:
    """The run's running tally, on a small actor that every unit commit reports to. The first
    report past the failure budget (or of a systemic failure) stops the job there, as the local
    engine does, instead of after every unit was quarantined. A unit retried after an actor died
    reports twice; both counts grow, so the error fraction barely moves."""

    def __init__(self, max_error_fraction: float, min_images: int):
        self.limits = (max_error_fraction, min_images)
        self.tally = Tally()
        self.verdict: str | None = None

    def add(self, tally: Tally) -> str | None:
        self.tally.merge(tally)
        if self.verdict is None:
            try:
                self.tally.check(*self.limits)
            except FatalError as exc:
                self.verdict = str(exc)
        return self.verdict

    def get_verdict(self) -> str | None:
        return self.verdict


def _verdict(budget) -> str | None:
    import ray

    try:
        return ray.get(budget.get_verdict.remote(), timeout=30)
    except Exception:  # the actor is gone too: the original error is the one to show
        return None


def _report(tally: Tally, budget) -> None:
    """Add a committed unit's counts to the run's budget; past it, fail this call (and the job)."""
    import ray

    if tally.images and (verdict := ray.get(budget.add.remote(tally))):
        raise FatalError(verdict)


def _pool_size(cfg: RayConfig, units: int) -> int:
    """The configured pool, else as many actors as the cluster's CPUs (or GPUs) hold."""
    if cfg.actors:
        return min(cfg.actors, units)
    import ray

    resources = ray.cluster_resources()
    fits = resources.get("CPU", 1) // cfg.actor_cpus
    if cfg.actor_gpus:
        fits = min(fits, resources.get("GPU", 0) // cfg.actor_gpus)
    return int(max(1, min(fits, units)))


def _all_local(units: list[WorkUnit]) -> bool:
    """Whether every unit is read from this machine's disk (a URI list may name URLs, Flickr
    metadata does)."""
    fetching = ("urilist", "flickr-meta")
    return all(u.kind not in fetching and storage.is_local(u.source) for u in units)


def _read_row(row: dict, job: JobConfig) -> dict:
    task: UnitTask = pickle.loads(row["item"])
    return {"item": pickle.dumps(read_for_analysis(task, job.http))}


class Analyzer:
    """Read a unit, decode, detect and embed its owned images, then commit the unit (or hand it on to wait
    for owners in other units). The model is loaded once per actor. Committing here rather than
    in tasks of its own saves a worker process per task on a small machine."""

    def __init__(
        self,
        model: ModelConfig,
        decode: DecodeConfig,
        http: HttpConfig,
        batch_size: int,
        commit: dict,
    ):
        # Decoding hostile bytes runs in a child process under the limits (pipelines.core.isolate),
        # which loads the model instead of the actor: a decoder crash costs one image, not the actor.
        self.pool = None
        if decode.isolate:
            self.pool = IsolatedPool(1, limits_for(decode, model), init_worker, (model, decode))
        self.model = None if self.pool else load_model(model)
        self.decode, self.http, self.batch_size = decode, http, batch_size
        self.commit = commit

    def __call__(self, row: dict) -> dict:
        item: UnitTask | UnitWork = pickle.loads(row["item"])
        work = item if isinstance(item, UnitWork) else read_for_analysis(item, self.http)
        checkpoint("analyze.batch")
        positions = sorted(work.todo)
        for start in range(0, len(positions), self.batch_size):
            chunk = positions[start : start + self.batch_size]
            results = self._analyze([work.todo[p] for p in chunk])
            work.results.update(zip(chunk, results, strict=True))
        work.todo.clear()  # the bytes are not needed past here
        return {**_commit_or_wait(work, **self.commit), "analyzed": len(positions)}

    def _analyze(self, batch: list[bytes]) -> list[ImageResult]:
        if self.pool is None:
            return analyze_batch(batch, self.model, self.decode)
        return resolve_batch(self.pool, self.pool.submit(analyze, batch), analyze, batch)


def _commit_or_wait(work: UnitWork, run: str, run_id: str, info: ModelInfo, foreign: dict, budget) -> dict:
    """Commit the unit now, or hand it on to wait for owners in units still being analysed."""
    summary = {"exports": pickle.dumps(exported_results(work))}
    if foreign_owners(work) - foreign.keys():
        return {**summary, "tally": pickle.dumps(Tally()), "waiting": True, "deferred": pickle.dumps(work)}
    tally = commit_unit(work, run, run_id, info.model_id, info.dim, foreign)
    _report(tally, budget)
    return {**summary, "tally": pickle.dumps(tally), "waiting": False, "deferred": b""}


def _commit_deferred(
    row: dict, run: str, run_id: str, info: ModelInfo, foreign: dict[int, ImageResult], budget
) -> dict:
    work: UnitWork = pickle.loads(row["deferred"])
    tally = commit_unit(work, run, run_id, info.model_id, info.dim, foreign)
    _report(tally, budget)
    return {"tally": pickle.dumps(tally)}
