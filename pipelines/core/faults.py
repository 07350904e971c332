"""Kill points for the kill-anywhere tests: ``checkpoint(name)`` SIGKILLs the process on request.

``FACEAUDIT_KILL_AT=unit.after_faces_shard:2`` kills the process the 2nd time it reaches that
point (``:1`` when the count is left out). Counts are per process. With
``FACEAUDIT_KILL_ONCE=/path/marker`` only the first process to get there dies: it creates the
marker (holding its pid and the point) first, so that a worker the engine restarts with the same
environment does not die again, and a test can tell which process was killed.

Unset, a checkpoint is one environment lookup. The variables are read at every checkpoint, so a
test may set them for one run in a process that has already passed checkpoints.

The points (each is one line in the code it names):

| point | where |
| --- | --- |
| ``analyze.batch`` | an engine is about to decode, detect and embed a batch |
| ``storage.before_rename`` | ``write_atomic`` wrote and synced its temporary file, not yet renamed |
| ``unit.after_faces_shard`` | a unit's faces shard is committed, its images shard not yet |
| ``run.before_manifest`` | every unit is committed, the run manifest not yet written |
| ``index.shard_written`` | the index build wrote a bundle shard's files (more may follow) |
| ``index.before_manifest`` | every bundle file is in place, the manifest not yet written |
| ``index.before_current`` | the bundle manifest is committed, CURRENT not yet moved |
| ``index.move_current`` | inside ``move_current``: CURRENT read, the new value not yet written |
| ``index.shard_task`` | a Ray task of the index build starts on a bundle shard |

Ray workers do not inherit the driver's environment (a session's Ray may be started before the
variables are set, or be a remote cluster), so the engines hand ``worker_env()`` to their actors
and tasks as their runtime environment.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

KILL_AT = "FACEAUDIT_KILL_AT"
KILL_ONCE = "FACEAUDIT_KILL_ONCE"

_reached: Counter = Counter()


def parse(value: str | None) -> tuple[str, int] | None:
    """``"point:n"`` -> (point, n); ``"point"`` -> (point, 1); empty -> None."""
    if not value:
        return None
    name, _, nth = value.strip().partition(":")
    if not name or (nth and not nth.isdigit()) or nth == "0":
        raise ValueError(f"{KILL_AT} must look like 'point' or 'point:n' (n >= 1), not {value!r}")
    return name, int(nth or 1)


def checkpoint(name: str) -> None:
    """Die by SIGKILL here if FACEAUDIT_KILL_AT names this point and this is its nth visit."""
    value = os.environ.get(KILL_AT)
    if not value:
        return
    target = parse(value)
    if target is None or target[0] != name:
        return
    _reached[name] += 1
    if _reached[name] == target[1] and _claim(f"{name}:{target[1]}"):
        os.kill(os.getpid(), signal.SIGKILL)


def _claim(point: str) -> bool:
    """True if this process may die: no marker asked for, or it created the marker first."""
    marker = os.environ.get(KILL_ONCE)
    if not marker:
        return True
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {point}\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def worker_env() -> dict[str, str]:
    """The fault variables that are set, for engines to hand to the workers they start."""
    return {k: os.environ[k] for k in (KILL_AT, KILL_ONCE) if os.environ.get(k)}


def ray_options() -> dict:
    """Ray remote options carrying the fault variables to a task or actor (none when unset)."""
    env = worker_env()
    return {"runtime_env": {"env_vars": env}} if env else {}
