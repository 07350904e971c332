"""Keep the last N index versions; delete older ones, orphans and the runs nothing needs any more.

Kept: the version CURRENT names and the N-1 versions before it in its history (the version each
was rebuilt from: what an operator can roll back to). Deleted: older committed versions; version
folders that never became CURRENT (no manifest: a crashed build; or out of CURRENT's history: a
rebuild that failed its checks or died before moving CURRENT) once older than CURRENT or than a
grace period, so a build in flight is never touched;
``rebuild-*`` runs under the work root that no kept version was built from. CURRENT's version is
never deleted, whatever N is.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field

from pipelines.core import storage

VERSION_RE = re.compile(r"^(?P<time>\d{8}T\d{6}Z)-[0-9a-f]{8}$")
REBUILD_RUN_PREFIX = "rebuild-"


@dataclass(frozen=True, slots=True)
class Version:
    committed: bool  # its manifest is written
    base: str | None = None  # the version a rebuild extended or replaced (rebuild.base_version)


@dataclass(slots=True)
class GcResult:
    kept: list[str] = field(default_factory=list)
    deleted_versions: list[str] = field(default_factory=list)
    deleted_runs: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "kept": self.kept,
            "deleted_versions": self.deleted_versions,
            "deleted_runs": self.deleted_runs,
        }


def version_time(name: str) -> dt.datetime | None:
    match = VERSION_RE.match(name)
    if not match:
        return None
    return dt.datetime.strptime(match.group("time"), "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)


def history(versions: dict[str, Version], current: str | None) -> list[str]:
    """CURRENT, the version it was rebuilt from, and so on back (newest first). A version made by a
    plain ``index build`` records no base: the chain goes on with the next older committed one."""
    chain: list[str] = []
    name = current
    while name is not None and name in versions and versions[name].committed and name not in chain:
        chain.append(name)
        base = versions[name].base
        if base is None:
            older = [v for v, info in versions.items() if info.committed and v < name]
            base = max(older) if older else None
        name = base
    return chain


def choose(
    versions: dict[str, Version], current: str | None, keep: int, now: dt.datetime, grace_s: float
) -> tuple[list[str], list[str]]:
    """(kept, deleted) among ``versions``. Pure: tested without a store."""
    kept = set(history(versions, current)[: max(keep, 1)])
    if current is None:  # no CURRENT yet: keep the newest committed ones, delete nothing committed
        kept = {v for v, info in versions.items() if info.committed}
    deleted = []
    for name in sorted(versions):
        if name in kept:
            continue
        info = versions[name]
        if info.committed and current is not None and name < current:
            deleted.append(name)  # older than CURRENT and out of the kept history
            continue
        born = version_time(name)
        if born is not None and (now - born).total_seconds() > grace_s:
            deleted.append(name)  # an orphan: never CURRENT, and no build can still be writing it
    return sorted(kept), deleted


def collect(
    index: str,
    work: str | None,
    keep: int,
    grace_s: float,
    current: str | None,
    now: dt.datetime | None = None,
    protect_runs: set[str] | None = None,
) -> GcResult:
    """Delete what ``choose`` rejects under ``index``, then unneeded rebuild runs under ``work``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    names = [n for n in storage.listdir(index) if VERSION_RE.match(n)]
    versions = {n: read_version(storage.join(index, n)) for n in names}
    kept, deleted = choose(versions, current, keep, now, grace_s)
    result = GcResult(kept=kept)
    needed = set(protect_runs or set())
    for name in kept:
        needed |= runs_of(storage.join(index, name))
    for name in deleted:
        storage.remove(storage.join(index, name))
        result.deleted_versions.append(name)
    if work:
        result.deleted_runs = collect_runs(work, needed)
    return result


def read_version(folder: str) -> Version:
    uri = storage.join(folder, "manifest.json")
    if not storage.exists(uri):
        return Version(False)
    try:
        manifest = json.loads(storage.read_text(uri))
    except ValueError:
        return Version(True)  # unreadable: kept out of any history, deleted once older than CURRENT
    return Version(True, (manifest.get("rebuild") or {}).get("base_version"))


def runs_of(version_folder: str) -> set[str]:
    """Run ids a committed version was built from (none for a folder without a manifest)."""
    uri = storage.join(version_folder, "manifest.json")
    if not storage.exists(uri):
        return set()
    return {r["run_id"] for r in json.loads(storage.read_text(uri)).get("runs", [])}


def collect_runs(work: str, needed: set[str]) -> list[str]:
    """Delete ``rebuild-*`` runs (committed or not) that no kept version needs; others are left alone."""
    deleted = []
    for name in storage.listdir(storage.join(work, "runs")):
        if name.startswith(REBUILD_RUN_PREFIX) and name not in needed:
            storage.remove(storage.join(work, "runs", name))
            deleted.append(name)
    return deleted
