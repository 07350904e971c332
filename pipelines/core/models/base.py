"""What every face model backend provides."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from ..config import ModelConfig
from ..records import DecodedImage, Face, ModelInfo


class FaceModel(ABC):
    """A detector plus embedder. ``analyze`` returns, per image, its faces in decreasing score.

    ``match_threshold`` is the cosine similarity (inner product of unit vectors) at or above
    which two faces are taken to be the same person; it is calibrated per model.
    """

    model_id: str
    dim: int
    match_threshold: float
    provenance: dict | None = None  # what the run manifest records of the weights and runtime

    def __init__(self, config: ModelConfig):
        self.config = config

    def info(self) -> ModelInfo:
        """What the model makes, as every run manifest records it."""
        return ModelInfo(self.model_id, self.dim, self.match_threshold, self.provenance)

    @abstractmethod
    def analyze(self, images: Sequence[DecodedImage]) -> list[list[Face]]:
        """Detect, align and embed every face of every image; may raise RecordError per batch."""


def model_id_for(config: ModelConfig) -> str:
    """The model_id a config will produce, without loading the weights."""
    if config.backend == "dlib":
        return f"dlib-{config.detector}+dlib-resnet-v1"
    # a pack given as a folder or gs:// URI is named by its last path part, so that the same pack
    # gives the same model_id wherever it is kept
    name = (config.pack or "buffalo_l").rstrip("/").rsplit("/", 1)[-1]
    return "scrfd_10g+w600k_r50" if name == "buffalo_l" else f"insightface-{name}"
