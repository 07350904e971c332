"""The model interface and its backends.

Load once, run many (after Beam's ModelHandler): ``load_model(config)`` builds a model once per
worker; ``model.analyze(batch)`` runs it on a batch of decoded images.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import FatalError
from .base import FaceModel, model_id_for

__all__ = ["FaceModel", "load_model", "model_id_for"]


def load_model(config: ModelConfig) -> FaceModel:
    """Build the configured backend; any failure is fatal for the job."""
    try:
        if config.backend == "dlib":
            from .dlib_backend import DlibModel

            return DlibModel(config)
        if config.backend == "insightface":
            from .insightface_backend import InsightfaceModel  # type: ignore[import-not-found]

            return InsightfaceModel(config)
    except FatalError:
        raise
    except Exception as exc:  # a model that won't load fails the job loudly
        raise FatalError(f"cannot load the {config.backend} model: {type(exc).__name__}: {exc}") from exc
    raise FatalError(f"unknown model backend {config.backend!r}")
