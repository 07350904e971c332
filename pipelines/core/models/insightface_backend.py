"""insightface's models on ONNX Runtime: SCRFD detection and ArcFace embedding, batched.

``InsightfaceModel(config)`` opens and verifies the pack (``insightface_pack``), picks its
detector and recogniser by their graphs' inputs and outputs (as insightface's model router
does), and builds one session for each on the configured providers (``onnx_session``).
``analyze`` detects on the whole batch at once (``insightface_detect``), aligns and embeds every
face of the batch together (``insightface_align``), and returns each image's faces best first.
See docs/insightface.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import FatalError, RecordError
from ..records import DecodedImage, Face
from .base import FaceModel, model_id_for
from .insightface_align import ArcFaceEmbedder, align, is_mxnet_export
from .insightface_detect import LAYOUTS, MEAN, STD, Detections, ScrfdDetector
from .insightface_pack import PackInfo, cache_dir, open_pack
from .onnx_session import SessionOptions, import_onnx, load_runner, with_pixel_input

# Cosine similarity at or above which two buffalo_l faces are taken to be one person. NOT
# calibrated here (that needs the real weights): it is insightface's own default for "same
# person" (insightface/gui/core/constants.py, DEFAULT_THRESHOLD = 0.4, used by compare_embeddings).
INSIGHTFACE_MATCH_THRESHOLD = 0.4

ARCFACE_MEAN, ARCFACE_STD = 127.5, 127.5


class InsightfaceModel(FaceModel):
    """SCRFD + ArcFace from an insightface model pack."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        try:
            self._load(config)
        except FatalError as exc:  # say which model, as load_model does for other failures
            raise FatalError(f"cannot load the insightface model: {exc}") from exc

    def _load(self, config: ModelConfig) -> None:
        self.pack: PackInfo = open_pack(config)
        detector_file, recognizer_file = find_models(self.pack.folder)
        options = SessionOptions(
            providers=list(config.providers),
            trt_cache=str(cache_dir(config) / "trt"),
            fp16=config.fp16,
            threads=config.threads,
        )
        self.detector = build_detector(detector_file, options, config)
        self.embedder = build_embedder(recognizer_file, options, config.embed_batch_size)
        self.model_id = model_id_for(config)
        self.dim = self.embedder.dim
        self.match_threshold = INSIGHTFACE_MATCH_THRESHOLD
        self.provenance = dict(
            self.pack.manifest(), detector=detector_file.name, recognizer=recognizer_file.name
        )

    def analyze(self, images: Sequence[DecodedImage]) -> list[list[Face]]:
        pixels = [image.pixels for image in images]
        try:
            found = [self._keep(d) for d in self.detector.detect(pixels)]
        except FatalError:
            raise
        except Exception as exc:
            raise RecordError("detect", f"{type(exc).__name__}: {exc}") from exc
        try:
            vectors = self.embedder.embed(align(pixels, [d.landmarks for d in found], self.embedder.size))
        except FatalError:
            raise
        except Exception as exc:
            raise RecordError("embed", f"{type(exc).__name__}: {exc}") from exc
        return to_faces(images, found, vectors)

    def _keep(self, found: Detections) -> Detections:
        """Drop boxes smaller than min_face_size, then keep the best max_faces."""
        sides = np.minimum(found.boxes[:, 2] - found.boxes[:, 0], found.boxes[:, 3] - found.boxes[:, 1])
        keep = np.flatnonzero(sides >= self.config.min_face_size)
        if self.config.max_faces:
            keep = keep[: self.config.max_faces]
        return Detections(found.boxes[keep], found.scores[keep], found.landmarks[keep])


def to_faces(
    images: Sequence[DecodedImage], found: list[Detections], vectors: np.ndarray
) -> list[list[Face]]:
    """Face records per image; boxes clipped to the image, landmarks as x1, y1, x2, y2, ..."""
    out, start = [], 0
    for image, det in zip(images, found, strict=True):
        w, h = image.width, image.height
        boxes = np.clip(det.boxes, 0, [w, h, w, h]).astype(np.float32)
        points = det.landmarks.reshape(-1, 10).astype(np.float32)
        embs = vectors[start : start + len(boxes)]
        start += len(boxes)
        out.append(
            [Face(b, float(s), p, e) for b, s, p, e in zip(boxes, det.scores, points, embs, strict=True)]
        )
    return out


def find_models(folder: Path) -> tuple[Path, Path]:
    """The pack's detector and recogniser, told apart by their graphs as insightface's router does."""
    kinds: dict[str, list[Path]] = {"detection": [], "recognition": []}
    for path in sorted(folder.glob("*.onnx")):
        kind = model_kind(import_onnx().load(str(path), load_external_data=False))
        if kind in kinds:
            kinds[kind].append(path)
    for kind, paths in kinds.items():
        if len(paths) != 1:
            raise FatalError(
                f"model pack {folder} needs exactly one {kind} model, found {[p.name for p in paths]}"
            )
    return kinds["detection"][0], kinds["recognition"][0]


def model_kind(model) -> str:
    """detection, recognition, or what else insightface would take the graph for."""
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(model.graph.output) in LAYOUTS:
        return "detection"
    size = dims[2] if len(dims) == 4 else 0
    if size in (192, 96) or len(inputs) != 1 or len(model.graph.output) != 1:
        return "other"  # landmarks (192), gender/age (96), face swapping (two inputs)
    return "recognition" if size >= 112 and size % 16 == 0 and size == dims[3] else "other"


def build_detector(path: Path, options: SessionOptions, config: ModelConfig) -> ScrfdDetector:
    model = import_onnx().load(str(path))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    # a graph with a fixed input size runs at that size only; otherwise at det_size
    in_h, in_w = (dims[2], dims[3]) if dims[2] > 0 and dims[3] > 0 else (config.det_size, config.det_size)
    probe = _probe_images(in_h, in_w)
    runner = load_runner(with_pixel_input(model, MEAN, STD), options, probe, config.det_batch_size)
    return ScrfdDetector(
        runner,
        n_outputs=len(model.graph.output),
        input_size=(in_w, in_h),
        threshold=config.det_threshold,
        nms_threshold=config.nms_threshold,
        batch_size=config.det_batch_size,
    )


def build_embedder(path: Path, options: SessionOptions, batch_size: int) -> ArcFaceEmbedder:
    model = import_onnx().load(str(path))
    size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    mean, std = (0.0, 1.0) if is_mxnet_export(model) else (ARCFACE_MEAN, ARCFACE_STD)
    probe = _probe_images(size, size)
    runner = load_runner(with_pixel_input(model, mean, std), options, probe, batch_size)
    dim = runner.run(probe[:1])[0].size
    return ArcFaceEmbedder(runner, dim=dim, size=size, batch_size=batch_size)


def _probe_images(height: int, width: int) -> np.ndarray:
    """Two different, fixed uint8 images: enough to tell whether a graph batches faithfully."""
    return np.random.default_rng(0).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
