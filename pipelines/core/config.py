"""Typed job configuration, loaded from YAML and from command-line flags alike."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .names import check_name

NAME_RE = re.compile(r"^[a-z0-9_-]+$")
DATASET_FORMATS = ("auto", "folder", "tar", "urls", "msceleb-tsv", "hf-parquet", "flickr-meta", "unknown")
DATASET_STATUSES = ("available", "withdrawn", "restricted", "unknown")
NO_SOURCE = re.compile(r"No source: (.+?)(?:\.(?:\s|$)|$)")  # a catalogue description's reason

# insightface's model zoo README: its pretrained packs are for non-commercial research only.
_INSIGHTFACE_TERMS = "insightface model zoo: non-commercial research purposes only"
INSIGHTFACE_PACK_LICENSES = {
    name: _INSIGHTFACE_TERMS for name in ("buffalo_l", "buffalo_m", "buffalo_s", "antelopev2")
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(Strict):
    """One data set of the registry (``configs/datasets/<name>.yaml``)."""

    name: str = Field(description="[a-z0-9_-]+, unique")
    source: str | None = Field(
        description="folder, tar/WebDataset shard(s), or a URI list file (.txt/.csv/.parquet); null only "
        "in a catalogue entry where nothing public can be fetched (its description says why): such an "
        "entry is listed and audited from an operator's own copy, never ingested as it is"
    )
    version: str = Field("", description="a new value means the data set changed")
    license: str = Field("unknown", description="what is known of its licence")
    description: str = ""
    removed: bool = Field(False, description="true: drop it from the next index version")
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="folders or gs:// prefixes outside its own folder that its URI list may name",
    )

    # The catalogue keys (configs/datasets/catalog/; DESIGN.md, "Data set registry"); what a
    # catalogue cannot establish is the string "unknown", never a guess.
    format: Literal[DATASET_FORMATS] = Field(  # type: ignore[valid-type]
        "auto",
        description="the published format: auto | folder | tar | urls | msceleb-tsv | hf-parquet | "
        "flickr-meta, or unknown (not established, or a form none of these readers takes; such a "
        "data set is not ingested); auto: from the source's extension and first bytes",
    )
    image_column: str = Field(
        "image", description="hf-parquet: the column holding the image struct (bytes and/or path)"
    )
    contact: str | None = Field(None, description="where the maintainer takes removal requests")
    status: Literal[DATASET_STATUSES] = Field(  # type: ignore[valid-type]
        "available",
        description="available | withdrawn | restricted (known, but not obtainable as published) | unknown",
    )
    citation: str | None = Field(None, description="the paper or page that introduced it")
    facts: list[str] = Field(
        default_factory=list, description="public http(s) sources for every statement of the entry"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"data set name {v!r} must match [a-z0-9_-]+")
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: object) -> str:
        return "" if v is None else str(v)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("source is empty (null, in a catalogue entry, when nothing can be fetched)")
        return v

    @field_validator("facts")
    @classmethod
    def _facts(cls, v: list[str]) -> list[str]:
        for url in v:
            if not re.match(r"^https?://[^\s/]+\S*$", url):
                raise ValueError(f"fact {url!r} is not an http(s) URL")
        return v

    @model_validator(mode="after")
    def _no_source_says_why(self) -> DatasetSpec:
        if self.source is None and not self.description.strip():
            raise ValueError(
                f"data set {self.name!r} has no source: its description must say why nothing can be fetched"
            )
        return self

    @property
    def ingestible(self) -> bool:
        """Whether a job can read it: an entry without a source is only listed (catalogue)."""
        return self.source is not None

    def no_source_reason(self, limit: int = 160) -> str:
        """Why it has no source: its description's "No source: ..." sentence, else its start."""
        text = " ".join(self.description.split())
        match = NO_SOURCE.search(text)
        why = match.group(1) if match else text
        return why if len(why) <= limit else why[: limit - 1].rstrip() + "\u2026"


class ModelConfig(Strict):
    """Which detector and embedder, and how they run."""

    backend: Literal["dlib", "insightface"] = "dlib"
    runtime: Literal["onnx", "dlib"] = Field(
        "onnx",
        description="dlib backend: run the descriptor and MMOD networks on ONNX Runtime (onnx), with the "
        "weights read from dlib's own files, or in dlib itself; both give the same model_id",
    )
    detector: Literal["hog", "cnn"] = Field("hog", description="dlib detector: HOG (fast, CPU) or MMOD CNN")
    detect_max_side: int = Field(
        640, ge=0, description="detect on a copy downscaled to this longest side (0: full size)"
    )
    upsample: int = Field(0, ge=0, le=3, description="dlib: times to upsample the detection copy")
    min_face_size: int = Field(20, ge=0, description="drop faces whose box is smaller, in original pixels")
    det_threshold: float = Field(
        0.0, description="dlib HOG: score offset (higher finds fewer faces); insightface: min score"
    )
    num_jitters: int = Field(1, ge=1, description="dlib: re-sampled descriptors averaged per face")
    max_faces: int = Field(0, ge=0, description="keep at most this many faces per image (0: all)")
    # insightface backend (docs/insightface.md)
    pack: str | None = Field(None, description="insightface model pack: a name, folder or gs:// URI")
    providers: list[str] = Field(
        default_factory=lambda: ["cpu"], description="ONNX Runtime providers in order: tensorrt, cuda, cpu"
    )
    pack_root: str | None = Field(
        None, description="where named packs live (default: insightface's ~/.insightface/models)"
    )
    pack_sha256: str | None = Field(
        None, description="sha256sum list that every .onnx file must match (default: <pack>/SHA256SUMS)"
    )
    pack_license: str | None = Field(
        None, description="the pack's licence, written to the run manifest (default: known for named packs)"
    )
    cache_dir: str | None = Field(
        None, description="local folder for gs:// packs and TensorRT engines (default: ~/.cache/faceaudit)"
    )
    det_size: int = Field(640, ge=32, description="insightface: detector input side (letterboxed to it)")
    nms_threshold: float = Field(0.4, ge=0, le=1, description="insightface: IoU above which boxes merge")
    det_batch_size: int = Field(
        16, ge=1, description="insightface, and dlib's MMOD on onnx: images per detector run"
    )
    embed_batch_size: int = Field(
        64, ge=1, description="insightface, and dlib on onnx: aligned faces per embedder run"
    )
    fp16: bool = Field(True, description="insightface on TensorRT: build fp16 engines")
    threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime CPU threads per worker (0: cores / workers on the local engine, "
        "ray.actor_cpus on Ray, ONNX Runtime's default elsewhere)",
    )

    @model_validator(mode="after")
    def _insightface_defaults(self) -> ModelConfig:
        """Defaults that differ by backend: SCRFD scores are probabilities (insightface keeps >= 0.5),
        and the licence of a known pack is written down so that it reaches the run manifest."""
        if self.backend != "insightface":
            return self
        if "det_threshold" not in self.model_fields_set:
            self.det_threshold = 0.5
        if self.pack_license is None:
            name = (self.pack or "buffalo_l").rstrip("/").rsplit("/", 1)[-1]
            self.pack_license = INSIGHTFACE_PACK_LICENSES.get(name, "unknown")
        return self


class HttpConfig(Strict):
    timeout_s: float = Field(
        20.0,
        gt=0,
        description="deadline of one attempt: connecting, the headers, redirects and the whole body",
    )
    retries: int = Field(3, ge=0, description="retries of a failed request (with backoff)")
    per_host: int = Field(4, ge=1, description="concurrent requests to one host")
    max_bytes: int = Field(64 << 20, gt=0, description="refuse a response larger than this")
    allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs of internal networks that may be fetched (e.g. a mirror); default: none",
    )

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for cidr in v:
            ipaddress.ip_network(cidr, strict=False)  # ValueError names the bad one
        return v


class DecodeConfig(Strict):
    max_pixels: int = Field(
        64_000_000, gt=0, description="reject images with more pixels (read from the header, before decoding)"
    )
    isolate: bool = Field(
        True, description="decode in worker processes under the limits below (false: in the engine's process)"
    )
    memory_limit_mb: int = Field(
        4096, ge=0, description="RLIMIT_AS address-space limit of each decoding worker (0: none; GPUs: none)"
    )
    timeout_s: float = Field(
        30.0, ge=0, description="a decode running longer ends its worker and fails that image (0: no limit)"
    )
    test_hooks: bool = Field(
        False, description="tests only: inputs starting FACEAUDIT-TEST-HOOK: crash or hang isolated decoders"
    )


class RayConfig(Strict):
    """Resources of the Ray engine; taken from here, never from probing the driver."""

    address: str | None = Field(
        None, description="Ray cluster to join (ray://host:10001, auto); default: RAY_ADDRESS, else local"
    )
    actors: int = Field(0, ge=0, description="model actors in the pool (0: cluster CPUs / actor_cpus)")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each model actor")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs reserved by each model actor (0.5: two share one)")
    read_cpus: float = Field(
        0.0, ge=0, description="CPUs reserved by each read and commit task (0: they mostly wait on I/O)"
    )
    batch_size: int = Field(
        0, ge=0, description="images per model call (0: 1 for dlib on its own runtime, 16 otherwise)"
    )
    driver_hash_max: int = Field(
        20_000,
        ge=0,
        description="a run of local files with at most this many pending images is hashed by the "
        "driver, not by Ray Data read tasks (which cost seconds to start)",
    )


class BeamConfig(Strict):
    """Pipeline options of the Beam engine (the command line's extra arguments are appended)."""

    options: list[str] = Field(
        default_factory=list,
        description="Beam pipeline options, e.g. ['--runner=DataflowRunner', '--project=p', '--region=r']",
    )
    max_batch_size: int = Field(
        0, ge=0, description="images per model call (0: 1 for dlib on its own runtime, 16 otherwise)"
    )


class JobConfig(Strict):
    """One ingest job: data sets in, a run folder out."""

    datasets: list[DatasetSpec]
    out: str = Field("runs-out", description="<out> root: a local path or gs://bucket/prefix")
    engine: Literal["local", "ray", "beam"] = "local"
    run_id: str | None = Field(None, description="reuse to resume a run; default: a new time-based id")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    decode: DecodeConfig = Field(default_factory=lambda: DecodeConfig())
    http: HttpConfig = Field(default_factory=lambda: HttpConfig())
    images_per_shard: int = Field(
        256, ge=1, description="images per work unit; each unit commits one faces and one images shard"
    )
    workers: int = Field(0, ge=0, description="worker processes (0: one per CPU core)")
    max_in_flight: int = Field(0, ge=0, description="images read but not yet written (0: 8 per worker)")
    max_error_fraction: float = Field(
        0.5, ge=0, le=1, description="stop the job, with no manifest, once more images than this have failed"
    )
    min_images_for_budget: int = Field(
        200, ge=1, description="images finished before max_error_fraction applies"
    )
    progress: bool = True
    erasure_log: str | None = Field(
        None, description="erasure log (e.g. <index>/_erasure) whose faces this ingest never writes"
    )
    ray: RayConfig = Field(default_factory=lambda: RayConfig(), description="the Ray engine's resources")
    beam: BeamConfig = Field(default_factory=lambda: BeamConfig(), description="the Beam engine's options")
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="folders or gs:// prefixes every data set's URI list may name besides its own folder",
    )

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "run id")

    @field_validator("datasets")
    @classmethod
    def _ingestible(cls, v: list[DatasetSpec]) -> list[DatasetSpec]:
        for spec in v:
            if not spec.ingestible:
                raise ValueError(no_source_message(spec))
        return v

    @model_validator(mode="after")
    def _share_roots(self) -> JobConfig:
        for spec in self.datasets:
            spec.allowed_roots = [
                *spec.allowed_roots,
                *(r for r in self.allowed_roots if r not in spec.allowed_roots),
            ]
        return self


def no_source_message(spec: DatasetSpec) -> str:
    """Why a job cannot ingest ``spec``, in one line."""
    return (
        f"data set {spec.name!r} has no source and cannot be ingested ({spec.no_source_reason()}); "
        "give it a source of your own (a copy you hold) in your registry"
    )


def load_registry(folder: str | os.PathLike[str]) -> dict[str, DatasetSpec]:
    """Every ``*.yaml`` data set spec in ``folder``, by name."""
    specs: dict[str, DatasetSpec] = {}
    for path in sorted(Path(folder).glob("*.y*ml")):
        try:
            spec = DatasetSpec.model_validate(_read_yaml(path))
        except ValidationError as exc:
            raise ConfigError(f"{path}: invalid data set: {_errors(exc)}") from exc
        if spec.name in specs:
            raise ConfigError(f"data set {spec.name!r} is defined twice in {folder}")
        specs[spec.name] = spec
    return specs


def load_job(path: str | os.PathLike[str], registry: str | os.PathLike[str] | None = None) -> JobConfig:
    """Read a job YAML. ``datasets`` entries are specs or names looked up in the registry."""
    raw = _read_yaml(Path(path))
    registry = registry or raw.pop("registry", None) or Path(path).parent.parent / "datasets"
    entries = raw.get("datasets") or []
    known: dict[str, DatasetSpec] | None = None
    resolved = []
    for entry in entries:
        if isinstance(entry, str):
            known = known if known is not None else load_registry(registry)
            if entry not in known:
                raise ConfigError(f"data set {entry!r} is not in the registry {registry}")
            if not known[entry].ingestible:
                raise ConfigError(no_source_message(known[entry]))
            resolved.append(known[entry])
        else:
            resolved.append(entry)
    raw["datasets"] = resolved
    return validate_job(raw)


def validate_job(raw: dict) -> JobConfig:
    try:
        job = JobConfig.model_validate(raw)
    except ValueError as exc:
        raise ConfigError(f"invalid job configuration: {exc}") from exc
    names = [d.name for d in job.datasets]
    if not names:
        raise ConfigError("the job names no data set")
    if len(set(names)) != len(names):
        raise ConfigError(f"a data set is named twice: {names}")
    return job


def _errors(exc: ValidationError) -> str:
    """A validation error in one line: each field and what is wrong with it."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping")
    return data
