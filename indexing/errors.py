"""Errors of the index bundle and of queries; all are faceaudit FatalErrors."""

from __future__ import annotations

from pipelines.core.errors import ConfigError, FatalError


class IntegrityError(FatalError):
    """A bundle file is missing, truncated or altered; ``file`` names it (relative to the bundle)."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"index bundle file {file}: {reason}; refusing to open the index")
        self.file = file


class QueryError(ConfigError):
    """A query that this index cannot answer: wrong dim, model or shape."""
