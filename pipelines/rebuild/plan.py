"""What a rebuild has to do: compare the registry with what the current index version was built from.

Pure functions of the registry, the fingerprints and the current manifest, so they are tested
exhaustively without ingesting anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.core.config import DatasetSpec


@dataclass(frozen=True, slots=True)
class Source:
    """One data set as an index version holds it: which runs hold its occurrences."""

    name: str
    version: str
    fingerprint: str | None  # None: built by a plain ``index build``, so unknown
    runs: tuple[str, ...]


@dataclass(slots=True)
class Delta:
    """The difference between the registry and the current version."""

    ingest: list[DatasetSpec] = field(default_factory=list)  # new or changed: ingested now
    keep: dict[str, Source] = field(default_factory=dict)  # unchanged: carried over as they are
    removed: list[str] = field(default_factory=list)  # in the current version, gone from the registry
    reasons: dict[str, str] = field(default_factory=dict)  # name -> why it is in its list

    @property
    def empty(self) -> bool:
        return not self.ingest and not self.removed

    def summary(self) -> dict:
        return {
            "ingest": [d.name for d in self.ingest],
            "unchanged": sorted(self.keep),
            "removed": self.removed,
            "reasons": dict(sorted(self.reasons.items())),
        }


def plan_delta(
    registry: dict[str, DatasetSpec], fingerprints: dict[str, str], current: dict[str, Source]
) -> Delta:
    """Sort every data set into ingest, keep or removed.

    ``registry``: every spec found (``removed: true`` ones included); ``fingerprints``: one per
    active spec; ``current``: the sources of the current version (empty for the first build).
    """
    delta = Delta()
    for name, spec in sorted(registry.items()):
        if spec.removed:
            if name in current:
                delta.removed.append(name)
                delta.reasons[name] = "removed: true in the registry"
            continue
        before = current.get(name)
        why = change_reason(spec, fingerprints[name], before)
        if why is None:
            assert before is not None
            delta.keep[name] = before
            delta.reasons[name] = "unchanged"
        else:
            delta.ingest.append(spec)
            delta.reasons[name] = why
    for name in sorted(set(current) - set(registry)):
        delta.removed.append(name)
        delta.reasons[name] = "its registry file is gone"
    return delta


def change_reason(spec: DatasetSpec, fingerprint: str, before: Source | None) -> str | None:
    """Why ``spec`` must be ingested, or None when the current version already holds it as it is."""
    if before is None:
        return "new"
    if before.fingerprint is None:
        return "no fingerprint recorded (built without rebuild)"
    if before.version != spec.version:
        return f"version {before.version!r} -> {spec.version!r}"
    if before.fingerprint != fingerprint:
        return "source listing changed"
    return None


def current_sources(manifest: dict | None) -> dict[str, Source]:
    """The sources an index manifest records (``rebuild.sources``), or what a plain build implies."""
    if not manifest:
        return {}
    recorded = (manifest.get("rebuild") or {}).get("sources")
    if recorded is not None:
        return {
            name: Source(name, s["version"], s["fingerprint"], tuple(s["runs"]))
            for name, s in recorded.items()
        }
    runs = tuple(r["run_id"] for r in manifest.get("runs", []))
    return {d["name"]: Source(d["name"], d["version"], None, runs) for d in manifest.get("datasets", [])}


def live_pairs(sources: dict[str, Source]) -> dict[str, set[str]]:
    """run_id -> names of the data sets whose occurrences in that run count."""
    live: dict[str, set[str]] = {}
    for source in sources.values():
        for run in source.runs:
            live.setdefault(run, set()).add(source.name)
    return live


def record_sources(sources: dict[str, Source]) -> dict:
    """The ``rebuild.sources`` block of an index manifest."""
    return {
        name: {"version": s.version, "fingerprint": s.fingerprint, "runs": list(s.runs)}
        for name, s in sorted(sources.items())
    }
