"""``faceaudit rebuild``'s configuration: a YAML file (``--config``) and flags alike."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from indexing.options import BuildOptions
from pipelines.core.config import BeamConfig, DecodeConfig, HttpConfig, ModelConfig, RayConfig, Strict
from pipelines.core.errors import ConfigError


class IndexSettings(BuildOptions):
    """How index versions are built: ``faceaudit index build``'s options (same names and defaults),
    and two that only a rebuild has."""

    min_recall: float | None = Field(
        None,
        ge=0,
        le=1,
        description="a version below this recall@10 never becomes CURRENT (default: target_recall)",
    )
    growth_factor: float = Field(
        2.0,
        ge=1,
        description="retrain once the collection is this many times the size the index was trained for",
    )


class RebuildConfig(Strict):
    registry: str = Field(
        "configs/datasets",
        description="folders of data set YAMLs, comma-separated; a later folder's entry of a name wins",
    )
    work: str = Field(description="<out> root of the ingest runs (local folder or gs://bucket/prefix)")
    index: str = Field(description="index root: versions, CURRENT, the lock and the reports")
    engine: Literal["local", "ray", "beam"] = "local"
    keep_versions: int = Field(3, ge=1, description="index versions kept: CURRENT and the ones before it")
    gc_grace_s: float = Field(
        3600, ge=0, description="a version folder that never became CURRENT is kept this long"
    )
    lock_ttl_s: int = Field(3600, ge=30, description="lock expiry; the holder renews it every third of this")
    beam_wait_s: float = Field(
        86400, ge=0, description="--engine beam: wait this long for a submitted ingest job, then resubmit"
    )
    model: ModelConfig | None = Field(None, description="default: the current version's model, else dlib HOG")
    decode: DecodeConfig = Field(default_factory=lambda: DecodeConfig())
    http: HttpConfig = Field(default_factory=lambda: HttpConfig())
    images_per_shard: int = Field(256, ge=1)
    workers: int = Field(0, ge=0, description="ingest worker processes (0: one per core)")
    progress: bool = True
    index_settings: IndexSettings = Field(default_factory=lambda: IndexSettings())
    ray: RayConfig = Field(default_factory=lambda: RayConfig(), description="--engine ray: its resources")
    beam: BeamConfig = Field(
        default_factory=lambda: BeamConfig(), description="--engine beam: pipeline options"
    )


def load_rebuild_config(path: str | Path | None, overrides: dict) -> RebuildConfig:
    """The YAML file's settings (if any) with flags (those not None) on top."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
    settings = dict(raw.get("index_settings") or {})
    for key, value in overrides.items():
        if value is None:
            continue
        if key in IndexSettings.model_fields:
            settings[key] = value
        else:
            raw[key] = value
    raw["index_settings"] = settings
    try:
        return RebuildConfig.model_validate(raw)
    except ValueError as exc:
        raise ConfigError(f"invalid rebuild configuration: {exc}") from exc
