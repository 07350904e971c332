"""The model inside a worker process: loaded once per process, then used for every batch (after
Beam's ``ModelHandler.load_model``). Every engine's workers start with ``init_worker``: the local
engine's process pool, a Ray actor's isolated child, the Beam handler's subprocess."""

from __future__ import annotations

from .config import DecodeConfig, ModelConfig
from .errors import FatalError
from .models import FaceModel, load_model
from .records import ImageResult, ModelInfo
from .stages import analyze_batch

_worker: dict = {}


def init_worker(model_config: ModelConfig, decode: DecodeConfig) -> None:
    _worker.clear()
    _worker["decode"] = decode
    try:
        _worker["model"] = load_model(model_config)
    except FatalError as exc:
        _worker["error"] = exc  # reported by the first task, so the driver fails loudly


def reset() -> None:
    _worker.clear()


def model() -> FaceModel:
    if "error" in _worker:
        raise _worker["error"]
    return _worker["model"]


def describe() -> ModelInfo:
    return model().info()


def analyze(batch: list[bytes]) -> list[ImageResult]:
    return analyze_batch(batch, model(), _worker["decode"])
