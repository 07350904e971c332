"""dlib's CPU models, with weights from the PyPI package face-recognition-models.

Detection (HOG or MMOD CNN) runs on a copy downscaled to ``detect_max_side``; the 5-point
landmarks and the 128-d ResNet descriptor are taken from the original-resolution pixels, so
small detection copies cost little accuracy. Landmarks are dlib's 5 points in dlib's order
(right eye outer and inner corner, left eye outer and inner corner, base of the nose).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..decode import downscale
from ..errors import FatalError, RecordError
from ..records import DecodedImage, Face
from .base import FaceModel, model_id_for

# Cosine similarity of L2-normalised descriptors at or above which two faces are taken to be one
# person. Calibrated on the verification pairs of tests/data/faces by bench/calibrate.py (see README).
DLIB_MATCH_THRESHOLD = 0.9223


def weight_file(name: str) -> str:
    """A weight file of the face-recognition-models package, found without importing it (its
    __init__ needs pkg_resources, which new setuptools releases drop)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FatalError("dlib's weights are missing: pip install face-recognition-models")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise FatalError(f"dlib weight file {name} is missing from face-recognition-models ({path})")
    return str(path)


class DlibModel(FaceModel):
    dim = 128
    match_threshold = DLIB_MATCH_THRESHOLD

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        try:
            import dlib
        except ImportError as exc:
            raise FatalError(f"the dlib backend needs dlib: pip install dlib-bin ({exc})") from exc
        self._dlib = dlib
        if config.detector == "cnn":
            self._cnn = dlib.cnn_face_detection_model_v1(weight_file("mmod_human_face_detector.dat"))
        else:
            self._hog = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(weight_file("shape_predictor_5_face_landmarks.dat"))
        encoder_file = weight_file("dlib_face_recognition_resnet_model_v1.dat")
        self._encoder = dlib.face_recognition_model_v1(encoder_file)
        self.model_id = model_id_for(config)

    def analyze(self, images: Sequence[DecodedImage]) -> list[list[Face]]:
        return [self._analyze_one(image) for image in images]

    def _analyze_one(self, image: DecodedImage) -> list[Face]:
        try:
            boxes, scores = self._detect(image)
        except Exception as exc:
            raise RecordError("detect", f"{type(exc).__name__}: {exc}") from exc
        if not boxes:
            return []
        try:
            return self._embed(image, boxes, scores)
        except Exception as exc:
            raise RecordError("embed", f"{type(exc).__name__}: {exc}") from exc

    def _detect(self, image: DecodedImage) -> tuple[list[tuple[float, float, float, float]], list[float]]:
        """Boxes (x1, y1, x2, y2 in original pixels) and scores, best first, size-filtered."""
        small, scale = downscale(image, self.config.detect_max_side)
        cfg = self.config
        if cfg.detector == "cnn":
            found = [(d.rect, d.confidence) for d in self._cnn(small, cfg.upsample)]
            found = [(r, s) for r, s in found if s >= cfg.det_threshold]
        else:
            rects, scores, _ = self._hog.run(small, cfg.upsample, cfg.det_threshold)
            found = list(zip(rects, scores, strict=True))
        found.sort(key=lambda rs: -rs[1])
        boxes, kept = [], []
        for rect, score in found:
            box = (
                rect.left() / scale,
                rect.top() / scale,
                (rect.right() + 1) / scale,
                (rect.bottom() + 1) / scale,
            )
            if min(box[2] - box[0], box[3] - box[1]) < cfg.min_face_size:
                continue
            boxes.append(box)
            kept.append(float(score))
        if cfg.max_faces:
            boxes, kept = boxes[: cfg.max_faces], kept[: cfg.max_faces]
        return boxes, kept

    def _embed(self, image: DecodedImage, boxes, scores) -> list[Face]:
        dlib = self._dlib
        pixels = image.pixels
        shapes = dlib.full_object_detections()
        for x1, y1, x2, y2 in boxes:
            rect = dlib.rectangle(round(x1), round(y1), round(x2) - 1, round(y2) - 1)
            shapes.append(self._landmarks(pixels, rect))
        vectors = np.asarray(self._encoder.compute_face_descriptor(pixels, shapes, self.config.num_jitters))
        vectors = vectors.astype(np.float32).reshape(len(boxes), self.dim)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        w, h = image.width, image.height
        faces = []
        for box, score, shape, vector in zip(boxes, scores, shapes, vectors, strict=True):
            points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
            bbox = np.clip(np.array(box, dtype=np.float32), 0, [w, h, w, h]).astype(np.float32)
            landmarks = points.reshape(-1)  # x1, y1, x2, y2, ...
            faces.append(Face(bbox=bbox, det_score=score, landmarks=landmarks, embedding=vector))
        return faces
