"""The run's plan: its data sets, their versions and sources, every unit's key and a digest of its
listing, written once at the run's first start (``<run>/_plan.json``, create-only). A later
attempt with another plan stops with ``RunConflict`` saying what differs; the clean-up of a
resumed run deletes only what this plan rules out."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import uuid

from . import storage
from .config import DatasetSpec, JobConfig
from .errors import FaceauditError, FatalError
from .records import WorkUnit
from .sources import plan_units
from .writer import RUN_PLAN

PLAN_FORMAT = "faceaudit.plan/1"


class RunConflict(FaceauditError):
    """The run id names a run with another plan: other data sets, versions, sources or units."""


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
    listed = "\n".join(unit.items)
    if unit.span or unit.columns:  # a record file's unit: its rows and columns, not only the file
        listed += f"\n#span={list(unit.span)}#columns={list(unit.columns)}"
    listing = hashlib.sha256(listed.encode()).hexdigest()
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
