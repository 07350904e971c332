"""Three kinds of failure, after dolma's fatal / shard / record split.

* ``FatalError``: the job cannot go on (a model that will not load, every record failing).
  Engines let it propagate and commit no manifest.
* ``RecordError``: one image is bad. Stages raise it; the engine turns it into an ``images`` row
  with ``status="error"``, the stage and a short reason, and goes on.
"""

from __future__ import annotations

STAGES = ("read", "decode", "detect", "embed")


class FaceauditError(Exception):
    """Base class of the errors faceaudit raises on purpose."""


class FatalError(FaceauditError):
    """The whole job must stop; the message says why and what to do."""


class ConfigError(FatalError):
    """A configuration or command line that cannot work."""


class RecordError(FaceauditError):
    """One record failed at ``stage``; ``reason`` is short and never holds pixels or vectors."""

    def __init__(self, stage: str, reason: str):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason[:300]


class AlreadyExists(FileExistsError):
    """A create-only write found the object already there."""


class Conflict(Exception):
    """A conditional write found the object changed since it was read (compare-and-swap lost)."""
