"""Engine-agnostic run bookkeeping: plan units, resume, assemble rows per unit, commit the run.

A unit is done when its ``images`` shard exists (its ``faces`` shard is committed just before),
so a re-run with the same run id skips done units and redoes the rest; the manifest is written
last and only when every unit is done.

One writer per run (``hold_run``): the driver of every engine holds the run's lock for the whole
run (``run_lock.py``), so a second process on the same run id stops with ``LockHeld`` naming the
holder before it touches anything; the run's plan (``run_plan.py``) is written once at the run's
first start, a later attempt with another plan stops with ``RunConflict``, and the clean-up of a
resumed run deletes only shards that this persisted plan rules out.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from . import erasure, orphans, storage
from .config import DatasetSpec, JobConfig
from .errors import FatalError
from .faults import checkpoint
from .names import check_name
from .records import ImageResult, RawImage, WorkUnit
from .run_lock import RunLock  # noqa: F401 - hold_run takes it; tests name it here too
from .run_plan import RunConflict, check_plan, list_units, persist_plan, plan_body, planned_parts  # noqa: F401
from .stages import face_rows, image_row, result_from_image_row
from .writer import (  # noqa: F401 - is_committed and read_manifest are the engines' too
    RUN_FORMAT,
    RUN_LOCK,
    RUN_PLAN,
    ShardInfo,
    commit_table,
    faces_table,
    images_table,
    is_committed,
    read_manifest,
    shard_info,
    write_manifest,
)


def new_run_id() -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(3)}"


def run_uri(out: str, run_id: str) -> str:
    """``<out>/runs/<run_id>``; a run id that is not a plain name is refused before any file is touched."""
    return storage.join(out, "runs", check_name(run_id, "run id"))


def part_name(unit: WorkUnit) -> str:
    return unit.key


@dataclass
class RunState:
    """What a run has committed so far, and what is left to do."""

    uri: str
    pending: list[WorkUnit]
    done: list[WorkUnit]
    # image_sha256 -> result (without faces) of images already committed in this run
    seen: dict[str, ImageResult] = field(default_factory=dict)
    run_id: str = ""
    committed: bool = False  # the manifest was there already: nothing to do
    lock: RunLock | None = None  # held by this process while it writes the run (hold_run)


# ---------------------------------------------------------------- one writer per run


@contextlib.contextmanager
def hold_run(job: JobConfig) -> Iterator[RunState]:
    """The job's run, opened for writing for the block; every engine's driver runs its job inside.

    The run id (``job.run_id``, else a new one) is checked first; then the data sets are listed
    (reading the sources, never the run). A committed run yields a state with ``committed`` set
    (after checking that its plan is this job's). Otherwise the run's lock is taken (LockHeld,
    naming the holder, when another process has it), the plan is written or compared
    (RunConflict), and the state to resume from is yielded; the lock goes when the block ends.
    """
    run_id = new_run_id() if job.run_id is None else check_name(job.run_id, "run id")
    uri = run_uri(job.out, run_id)
    listed = list_units(job)
    plan = plan_body(job, listed)
    if is_committed(uri):
        check_plan(uri, run_id, plan)
        yield RunState(uri, [], [], run_id=run_id, committed=True)
        return
    with RunLock(uri, run_id) as lock:
        if is_committed(uri):  # committed by the holder that released the lock just before
            check_plan(uri, run_id, plan)
            yield RunState(uri, [], [], run_id=run_id, committed=True)
            return
        state = plan_run(job, run_id, listed, plan)
        state.lock = lock
        yield state


# ---------------------------------------------------------------- resuming


def plan_run(
    job: JobConfig,
    run_id: str,
    listed: list[tuple[DatasetSpec, list[WorkUnit]]] | None = None,
    plan: dict | None = None,
) -> RunState:
    """The state to resume ``run_id`` from; call it holding the run's lock (``hold_run`` does).

    The plan is persisted (or compared: RunConflict), the run pointed at its erasure log, and the
    leftovers of crashed attempts deleted: temporary files, and shards of units the persisted
    plan does not hold."""
    uri = run_uri(job.out, run_id)
    listed = list_units(job) if listed is None else listed
    persisted = persist_plan(uri, run_id, plan_body(job, listed) if plan is None else plan)
    erasure.point_run(uri, job.erasure_log)  # every worker that commits here honours that log
    committed = set(storage.listdir(storage.join(uri, "images")))
    pending, done = [], []
    for _, units in listed:
        for unit in units:
            (done if f"part-{part_name(unit)}.parquet" in committed else pending).append(unit)
    state = RunState(uri, pending, done, run_id=run_id)
    orphans.clean_run(uri, planned_parts(persisted))  # crashes' leftovers
    for unit in done:
        _remember_committed(state, unit)
    return state


def _remember_committed(state: RunState, unit: WorkUnit) -> None:
    for row in committed_images(state.uri, unit):
        sha = row["image_sha256"]
        if sha and sha not in state.seen:
            state.seen[sha] = result_from_image_row(row)


def committed_images(run: str, unit: WorkUnit) -> list[dict]:
    """The rows of a done unit's ``images`` shard, in the unit's order."""
    return read_table(storage.join(run, f"images/part-{part_name(unit)}.parquet")).to_pylist()


def read_table(uri: str):
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


class UnitBuffer:
    """Rows of one unit, collected in order and committed as two shards."""

    def __init__(self, unit: WorkUnit, run_id: str, model_id: str, dim: int):
        self.unit, self.run_id, self.model_id, self.dim = unit, run_id, model_id, dim
        self.image_rows: list[dict] = []
        self.face_rows: list[dict] = []

    def add(self, raw: RawImage, result: ImageResult, owner: bool) -> None:
        """``owner``: this is the image's first occurrence in the run, so its faces are written here."""
        self.image_rows.append(image_row(result, raw.dataset, raw.source_uri, self.run_id, raw.provenance))
        if owner:
            self.face_rows.extend(face_rows(result, raw.dataset, raw.source_uri, self.model_id, self.run_id))

    def commit(self, run: str) -> list[ShardInfo]:
        part = part_name(self.unit)
        faces = commit_table(run, "faces", part, faces_table(self.face_rows, self.dim))
        checkpoint("unit.after_faces_shard")
        images = commit_table(run, "images", part, images_table(self.image_rows))  # the unit's commit mark
        return [faces, images]


@dataclass
class Tally:
    """Counts for the progress bar and the systemic-failure check."""

    images: int = 0
    faces: int = 0
    status: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)

    def add(self, result: ImageResult) -> None:
        self.images += 1
        self.faces += result.n_faces
        self.status[result.status] += 1
        if result.status == "error":
            self.reasons[f"{result.error_stage}: {result.error}"] += 1

    def merge(self, other: Tally) -> None:
        self.images += other.images
        self.faces += other.faces
        self.status.update(other.status)
        self.reasons.update(other.reasons)

    def check_systemic(self, min_images: int = 200) -> None:
        """Every one of many records failing means the job, not the data, is broken."""
        if self.images >= min_images and self.status["error"] == self.images:
            self.fail()

    def check_budget(self, max_error_fraction: float, min_images: int) -> None:
        """Past the run's failure budget the job stops: quarantining most of a data set as errors
        means something is wrong with the job (or the source), and the operator should look."""
        errors = self.status["error"]
        if self.images >= min_images and errors > max_error_fraction * self.images:
            raise FatalError(
                f"{errors} of {self.images} images failed, more than max_error_fraction "
                f"({max_error_fraction:g}); no manifest was written; most common reasons: {self._top()}"
            )

    def check(self, max_error_fraction: float, min_images: int) -> None:
        """While a run goes on: a systemic failure, or the failure budget spent, stops the job."""
        self.check_systemic()
        self.check_budget(max_error_fraction, min_images)

    def check_end(self, max_error_fraction: float, min_images: int) -> None:
        """At the end of a run: every image failing (however few) or the budget spent fails it."""
        if self.images and self.status["error"] == self.images:
            self.fail()
        self.check_budget(max_error_fraction, min_images)

    def _top(self) -> str:
        return "; ".join(f"{reason} (x{n})" for reason, n in self.reasons.most_common(3))

    def fail(self) -> None:
        raise FatalError(f"every one of {self.images} images failed; most common reasons: {self._top()}")


def finish_run(state: RunState, manifest: dict) -> dict:
    """List every committed shard, count, and write the manifest (the run's commit point)."""
    orphans.remove_tmp(state.uri)  # of workers killed during this attempt (their units were redone)
    shards = []
    for table in ("faces", "images"):
        for name in storage.listdir(storage.join(state.uri, table)):
            if name.startswith("part-") and name.endswith(".parquet"):
                shards.append(shard_info(state.uri, f"{table}/{name}"))
    counts = _count(state.uri, shards)
    if counts["images"] and counts["error"] == counts["images"]:
        raise FatalError(f"every one of {counts['images']} images failed; no manifest was written")
    body = dict(manifest, format=RUN_FORMAT, counts=counts)
    body["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
    checkpoint("run.before_manifest")
    if state.lock is not None:
        state.lock.check()  # a lock lost to another process: that process commits the run
    write_manifest(state.uri, body, shards)
    return body


def _count(run: str, shards: list[ShardInfo]) -> dict:
    counts: Counter = Counter()
    per_dataset: dict[str, Counter] = {}
    for shard in shards:
        if shard.table == "faces":
            counts["faces"] += shard.rows
            continue
        table = read_table(storage.join(run, shard.file)).select(["dataset", "status", "n_faces"])
        for row in table.to_pylist():
            counts["images"] += 1
            counts[row["status"]] += 1
            ds = per_dataset.setdefault(row["dataset"], Counter())
            ds["images"] += 1
            ds[row["status"]] += 1
            ds["faces"] += row["n_faces"]
    out = {key: counts.get(key, 0) for key in ("images", "ok", "no_face", "error", "faces")}
    out["per_dataset"] = {name: dict(c) for name, c in sorted(per_dataset.items())}
    return out


@dataclass
class RunSummary:
    """What an engine's ``run_job`` returns."""

    run_id: str
    uri: str
    manifest: dict
    resumed_units: int = 0
    seconds: float = 0.0
    analyzed: int = 0  # images sent to the model (each distinct image once)
