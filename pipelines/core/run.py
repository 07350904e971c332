"""Engine-agnostic run bookkeeping: plan units, resume, assemble rows per unit, commit the run.

A unit is done when its ``images`` shard exists (its ``faces`` shard is committed just before),
so a re-run with the same run id skips done units and redoes the rest; the manifest is written
last and only when every unit is done.

One writer per run (``hold_run``): the driver of every engine holds the run's lock for the whole
run (a ``flock`` on ``<run>/_run.lock`` locally, released by the kernel when the process dies; an
``ExpiringLock`` object with a heartbeat on gs://), so a second process on the same run id stops
with ``LockHeld`` naming the holder before it touches anything. The run's plan (data sets, their
versions and sources, every unit's key and listing) is written once, create-only, at the run's
first start (``<run>/_plan.json``); a later attempt with another plan stops with ``RunConflict``,
and the clean-up of a resumed run deletes only shards that this persisted plan rules out.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import secrets
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from . import erasure, orphans, storage
from .config import DatasetSpec, JobConfig
from .errors import ConfigError, FaceauditError, FatalError
from .faults import checkpoint
from .locks import ExpiringLock, LockHeld
from .names import check_name
from .records import ImageResult, RawImage, WorkUnit
from .sources import plan_units
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

PLAN_FORMAT = "faceaudit.plan/1"
RUN_LOCK_TTL_S = 900  # gs://: a run lock whose heartbeat stopped this long ago is stale (its holder died)


class RunConflict(FaceauditError):
    """The run id names a run with another plan: other data sets, versions, sources or units."""


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


_HELD: set[int] = set()  # descriptors of run locks this process holds


def _close_held_in_child() -> None:
    """A forked child must not keep its parent's run lock alive after the parent dies."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)  # closes the child's copy only; the parent still holds the lock
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunLock:
    """The run's exclusive lock: ``with RunLock(run_uri, run_id): ...`` or LockHeld.

    Locally a ``flock`` on ``<run>/_run.lock`` (0600), which the kernel releases when the process
    dies however it dies; the file holds the holder's ``host:pid`` for the message a second
    process prints, and is removed on release. On gs:// an ``ExpiringLock`` object in the run
    folder (a create-only upload with a generation precondition, an expiry renewed by a heartbeat,
    taken over only once stale); ``check`` fails if it was taken over meanwhile.
    """

    def __init__(self, run: str, run_id: str, ttl_s: int = RUN_LOCK_TTL_S):
        self.uri = storage.join(run, RUN_LOCK)
        self.holder = f"ingest run {run_id}"
        self._fd: int | None = None
        self._remote: ExpiringLock | None = None
        if not storage.is_local(run):
            if not storage.is_gcs(run):
                raise ConfigError(f"runs are written to a local folder or gs://, not {run}")
            self._remote = ExpiringLock(run, ttl_s=ttl_s, name=RUN_LOCK, holder=self.holder)

    def acquire(self) -> None:
        if self._remote is not None:
            self._remote.acquire()
            return
        path = storage.url_to_fs(self.uri)[1]
        storage.make_dirs(os.path.dirname(path))
        while True:
            fd = storage.create_private(path, os.O_RDWR | os.O_CREAT)
            if not _flock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise LockHeld(f"{self.holder} is in progress ({holder}); lock {path}")
            if _same_file(fd, path):
                break
            os.close(fd)  # the holder removed the file as it let go: lock the one there now
        host = socket.gethostname()
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        info = {"owner": f"{host}:{os.getpid()}", "host": host, "pid": os.getpid(), "started_at": now}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD.add(fd)

    def check(self) -> None:
        """Before the run's commit: FatalError if the lock was taken over (gs://, expired)."""
        if self._remote is not None:
            self._remote.check()

    def release(self) -> None:
        if self._remote is not None:
            self._remote.release()
            return
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(fd)
        path = storage.url_to_fs(self.uri)[1]
        try:
            if _same_file(fd, path):
                os.unlink(path)  # while still locked: a waiter re-checks the file it locked
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(fd: int, tries: int = 5) -> bool:
    """Take the exclusive lock without waiting for a holder; a few quick retries ride over a
    probe (``faceaudit gc`` asks whether a run is alive by taking a shared lock for an instant)."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.05)
    return False


def _same_file(fd: int, path: str) -> bool:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (found.st_dev, found.st_ino)


def _read_holder(fd: int, tries: int = 20) -> str:
    """``held by host:pid since ...`` from the lock file (its holder writes it just after locking)."""
    for attempt in range(tries):
        try:
            info = json.loads(os.pread(fd, 4096, 0))
            return f"held by {info['owner']} since {info['started_at']}; it goes when that process ends"
        except (ValueError, TypeError, KeyError):
            if attempt + 1 < tries:
                time.sleep(0.05)
    return "holder unknown"


# ---------------------------------------------------------------- the plan


def list_units(job: JobConfig) -> list[tuple[DatasetSpec, list[WorkUnit]]]:
    """Every data set of the job with its work units, in job order (reads the sources only)."""
    return [(spec, plan_units(spec, job.images_per_shard)) for spec in job.datasets]


def plan_body(job: JobConfig, listed: list[tuple[DatasetSpec, list[WorkUnit]]]) -> dict:
    """What a run id stands for: its data sets (name, version, source) and units (key, kind,
    source, how many items and a digest of their list), and the images per unit."""
    return {
        "images_per_shard": job.images_per_shard,
        "datasets": [
            {
                "name": spec.name,
                "version": spec.version,
                "source": units[0].source if units else spec.source,  # normalised (absolute paths)
                "units": [_unit_entry(unit) for unit in units],
            }
            for spec, units in listed
        ],
    }


def _unit_entry(unit: WorkUnit) -> dict:
    listing = hashlib.sha256("\n".join(unit.items).encode()).hexdigest()
    return {
        "key": unit.key,
        "kind": unit.kind,
        "source": unit.source,
        "items": len(unit.items),
        "list": listing,
    }


def planned_parts(plan: dict) -> set[str]:
    """The shard file names (``part-<key>.parquet``) of every unit the plan holds."""
    return {f"part-{u['key']}.parquet" for d in plan["datasets"] for u in d["units"]}


def persist_plan(run: str, run_id: str, plan: dict) -> dict:
    """Write ``plan`` as the run's plan at its first start (create-only), else compare it with
    the plan written then: RunConflict when they differ. Returns the persisted plan."""
    uri = storage.join(run, RUN_PLAN)
    if not storage.exists(uri):
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        body = {"format": PLAN_FORMAT, "run_id": run_id, "created_at": now, "plan": plan}
        with contextlib.suppress(storage.AlreadyExists):
            _create(uri, json.dumps(body, indent=1, sort_keys=True).encode())
    return check_plan(run, run_id, plan)


def check_plan(run: str, run_id: str, plan: dict) -> dict:
    """RunConflict unless the run's persisted plan (if it has one) is ``plan``."""
    uri = storage.join(run, RUN_PLAN)
    if not storage.exists(uri):
        return plan  # a run started before plans were written
    try:
        stored = json.loads(storage.read_bytes(uri))
        persisted = stored["plan"]
        if stored.get("format") != PLAN_FORMAT or not isinstance(persisted, dict):
            raise ValueError("not a plan")
    except (ValueError, KeyError, TypeError) as exc:
        raise FatalError(f"{uri} is not a {PLAN_FORMAT} file ({exc}); the run cannot be checked") from exc
    if persisted != plan:
        raise RunConflict(_difference(run_id, persisted, plan))
    return persisted


def _difference(run_id: str, old: dict, new: dict) -> str:
    """One line: how this job's plan differs from the run's."""

    def names(plan: dict) -> str:
        sets = plan["datasets"]
        return ", ".join(d["name"] + (f" (version {d['version']})" if d["version"] else "") for d in sets)

    def size(d: dict) -> str:
        return f"{len(d['units'])} units, {sum(u['items'] for u in d['units'])} items"

    old_sets, new_sets = old["datasets"], new["datasets"]
    if [d["name"] for d in old_sets] != [d["name"] for d in new_sets]:
        what = f"data sets {names(old)}; this job: {names(new)}"
    elif old["images_per_shard"] != new["images_per_shard"]:
        what = f"{old['images_per_shard']} images per shard; this job: {new['images_per_shard']}"
    else:
        what = "a plan of another format"
        for a, b in zip(old_sets, new_sets, strict=True):
            if a["version"] != b["version"]:
                what = f"data set {a['name']} at version {a['version']!r}; this job: {b['version']!r}"
            elif a["source"] != b["source"]:
                what = f"data set {a['name']} from {a['source']}; this job: {b['source']}"
            elif a != b:
                what = f"data set {a['name']} listed as {size(a)}; its listing changed, this job: {size(b)}"
            else:
                continue
            break
    return (
        f"run {run_id} was started with another plan ({what}); a run id names one plan: resume it "
        "with the same data sets, versions, sources and images per shard, or give a new --run-id"
    )


def _create(uri: str, data: bytes) -> None:
    """Create ``uri`` whole, failing with AlreadyExists if it is there. Locally the same
    temporary file, fsync and hard link as ``storage.write_atomic``, outside its kill point (the
    kill-anywhere tests count that point's visits from a run's first shard)."""
    if not storage.is_local(uri):
        storage.write_atomic(uri, data, create_only=True)
        return
    path = storage.url_to_fs(uri)[1]
    folder = os.path.dirname(path)
    storage.make_dirs(folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}{storage.TMP_MARK}{uuid.uuid4().hex}")
    try:
        with os.fdopen(storage.create_private(tmp), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise storage.AlreadyExists(path) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
        self.image_rows.append(image_row(result, raw.dataset, raw.source_uri, self.run_id))
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
