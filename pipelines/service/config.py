"""The look-up service's configuration: a YAML file (``--config serve.yaml``), then flags on top.

Every key has a default and a description (``faceaudit serve --help`` and docs/service.md list
them); ``describe()`` renders them. Secrets may come from the environment instead of the file:
``FACEAUDIT_RECORD_KEY`` (the record tokens' HMAC key) and ``FACEAUDIT_SOURCES_TOKEN`` (the
bearer token that unlocks ``results=sources``).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.core.errors import ConfigError

MB = 1 << 20


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str = Field(
        "", description="index root (CURRENT is opened) or version folder; local path or gs://"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on")
    public_key: str | None = Field(
        None, description="Ed25519 public key (PEM path): refuse an index not signed by it"
    )
    cache_dir: str | None = Field(
        None, description="where a gs:// index is downloaded (default ~/.cache/faceaudit/index)"
    )
    reload_on_current: bool = Field(
        False, description="open a new version when CURRENT moves, without a restart"
    )
    reload_interval_s: float = Field(
        30.0, gt=0, description="how often CURRENT is read with reload_on_current"
    )
    workers: int = Field(
        2, ge=1, le=64, description="photo searches that run at once (threads, decode processes, models)"
    )
    queue: int = Field(
        4,
        ge=0,
        le=1024,
        description="photo searches that may wait for a worker; beyond it: 503 + Retry-After",
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After (s) of a 503 when the service is full")
    max_upload_bytes: int = Field(5 * MB, ge=1024, le=64 * MB, description="largest photo accepted (bytes)")
    k: int = Field(20, ge=1, le=1000, description="indexed faces searched per face in a photo")
    possible_threshold: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="cosine similarity of the 'possible' band; default: the model's calibrated threshold "
        "(the 'strong' band, the manifest's match_threshold) minus possible_margin",
    )
    possible_margin: float = Field(
        0.05, ge=0, lt=1, description="how far below the calibrated threshold the 'possible' band reaches"
    )
    record_key: str | None = Field(
        None,
        description="HMAC-SHA256 key of record tokens (at least 16 characters; or FACEAUDIT_RECORD_KEY); "
        "unset: a random key per process, so tokens die with a restart",
    )
    record_ttl_s: int = Field(7 * 86400, ge=60, description="how long a record token stays valid (s)")
    sources_token: str | None = Field(
        None,
        description="bearer token that unlocks results=sources (or FACEAUDIT_SOURCES_TOKEN); unset: never",
    )
    search_per_hour: int = Field(5, ge=1, description="photo searches per client address per hour")
    range_per_minute: int = Field(60, ge=1, description="range look-ups per client address per minute")
    requests_per_hour: int = Field(10, ge=1, description="erasure requests per client address per hour")
    trust_forwarded_for: bool = Field(
        False, description="key rate limits on X-Forwarded-For's first address (only behind a trusted proxy)"
    )
    registry: list[str] = Field(
        default_factory=lambda: ["configs/datasets/catalog", "configs/datasets"],
        description="registry folders read for each data set's licence, description and removal contact",
    )

    def record_secret(self) -> bytes | None:
        key = self.record_key or os.environ.get("FACEAUDIT_RECORD_KEY")
        return key.encode() if key else None

    def bearer(self) -> str | None:
        return self.sources_token or os.environ.get("FACEAUDIT_SOURCES_TOKEN") or None


def load(path: str | os.PathLike | None, overrides: dict) -> ServeConfig:
    """The file's keys (if any), then every override that is not None."""
    raw: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping")
        raw.update(data or {})
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid serve config: {errors}") from exc


def describe() -> str:
    """Every key, its default and description, as YAML comments (docs/service.md)."""
    lines = []
    for name, field in ServeConfig.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        lines.append(
            f"{name}: {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}"
            f"  # {field.description}"
        )
    return "\n".join(lines)
