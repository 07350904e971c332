"""What the distributed engines share: the model's description, the manifest header, extras."""

from __future__ import annotations

import datetime as dt
import importlib
from types import ModuleType

from ..core.config import JobConfig, ModelConfig
from ..core.errors import FatalError
from ..core.models import load_model
from ..core.records import ModelInfo


def describe_model(config: ModelConfig) -> ModelInfo:
    """Load the model once (on a worker, with the workers' resources) and say what it makes.

    A model that will not load fails here, before any unit is read, with load_model's message.
    """
    return load_model(config).info()


def default_batch_size(config: ModelConfig, configured: int) -> int:
    """dlib running its own networks analyses one image at a time; batched backends (dlib's
    networks on ONNX Runtime embed the faces of a whole batch together) get 16 per call."""
    return configured or (1 if config.backend == "dlib" and config.runtime == "dlib" else 16)


def worker_model(config: ModelConfig, cores_per_worker: float) -> ModelConfig:
    """The model config a worker loads: ``threads: 0`` becomes the worker's share of the cores.

    ONNX Runtime's default is a thread per physical core in every process; with a worker per core
    that is cores x cores threads, which preempt each other and the workers' single-threaded parts
    (decoding, PDQ, HOG). An explicit ``threads`` is kept. Threads change speed only: the results
    are the same (the job's manifest keeps the configured value)."""
    if config.threads:
        return config
    return config.model_copy(update={"threads": max(1, int(cores_per_worker))})


def manifest_header(
    job: JobConfig,
    run_id: str,
    engine: str,
    info: ModelInfo,
    started: dt.datetime,
    known_from: list[str] | None = None,
) -> dict:
    """The manifest fields every engine writes (finish_run adds counts and shards).
    ``known_from``: the runs holding the faces of images this run knew and did not embed again."""
    header = {
        "run_id": run_id,
        "engine": engine,
        "model_id": info.model_id,
        "dim": info.dim,
        "match_threshold": info.match_threshold,
        "model": job.model.model_dump(),
        "model_provenance": info.provenance,
        "datasets": [d.model_dump(include={"name", "version", "source", "license"}) for d in job.datasets],
        "config": job.model_dump(mode="json"),
        "created_at": started.isoformat(),
    }
    if known_from is not None:
        header["faces_from_runs"] = sorted(known_from)
    return header


def require(module: str, extra: str) -> ModuleType:
    """Import an optional engine, or say which pip install brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise FatalError(
            f"the {extra} engine needs {module.split('.')[0]}: pip install 'faceaudit[{extra}]' ({exc})"
        ) from exc
