"""What an erasure sweep did."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Report:
    """What a sweep did."""

    entry: str | None = None
    run_faces_removed: int = 0
    run_shards_rewritten: int = 0
    runs_updated: list[str] = field(default_factory=list)
    bundle_faces_removed: dict[str, int] = field(default_factory=dict)  # version folder -> faces
    files_deleted: int = 0
    noncurrent_deleted: int = 0
    caches_removed: list[str] = field(default_factory=list)
