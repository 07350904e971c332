"""dlib's models, with weights from the PyPI package face-recognition-models.

Detection (HOG or MMOD CNN) runs on a copy downscaled to ``detect_max_side``; the 5-point
landmarks and the 128-d ResNet descriptor are taken from the original-resolution pixels, so
small detection copies cost little accuracy. Landmarks are dlib's 5 points in dlib's order
(right eye outer and inner corner, left eye outer and inner corner, base of the nose).

``model.runtime`` picks where the two networks run. ``onnx`` (the default): the descriptor, and
the MMOD detector for ``detector: cnn``, run on ONNX Runtime as graphs built from dlib's own
``.dat`` files (``dlib_onnx``), on the configured providers; the face chips of every image of a
batch are embedded together in runs of ``embed_batch_size``, and MMOD takes same-size detection
copies together in runs of ``det_batch_size``. ``dlib``: dlib runs them itself, image by image.
HOG, the landmarks and ``get_face_chip`` are dlib's in both. The descriptors agree to 1e-5, so
the model_id is the same and both runtimes' embeddings share an index.
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


RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
MMOD_FILE = "mmod_human_face_detector.dat"
CHIP_SIZE, CHIP_PADDING = 150, 0.25  # get_face_chip's defaults, which compute_face_descriptor uses

Box = tuple[float, float, float, float]


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
        self._landmarks = dlib.shape_predictor(weight_file("shape_predictor_5_face_landmarks.dat"))
        self.model_id = model_id_for(config)
        if config.runtime == "onnx":
            self._load_onnx(config)
            return
        if config.detector == "cnn":
            self._cnn = dlib.cnn_face_detection_model_v1(weight_file(MMOD_FILE))
        else:
            self._hog = dlib.get_frontal_face_detector()
        self._encoder = dlib.face_recognition_model_v1(weight_file(RESNET_FILE))
        self.provenance = {"runtime": "dlib", "dlib": getattr(dlib, "__version__", "unknown")}

    def _load_onnx(self, config: ModelConfig) -> None:
        from .dlib_onnx import load_onnx_nets

        if config.num_jitters > 1:
            # dlib's jitter draws random crops, flips and colour shifts from its own generator;
            # an approximation would give other vectors under the same model_id, so it is refused
            raise FatalError(
                f"model.num_jitters {config.num_jitters} needs model.runtime: dlib (the onnx runtime "
                "computes dlib's descriptor without jitter only)"
            )
        nets = load_onnx_nets(config, weight_file(RESNET_FILE), weight_file(MMOD_FILE))
        self._nets = nets
        if config.detector != "cnn":
            self._hog = self._dlib.get_frontal_face_detector()
        self.provenance = nets.provenance

    def analyze(self, images: Sequence[DecodedImage]) -> list[list[Face]]:
        if self.config.runtime == "onnx":
            return self._analyze_batch(images)
        return [self._analyze_one(image) for image in images]

    # --- dlib runtime: one image at a time -----------------------------------------------------

    def _analyze_one(self, image: DecodedImage) -> list[Face]:
        try:
            boxes, scores = self._detect(image)
        except Exception as exc:
            raise RecordError("detect", f"{type(exc).__name__}: {exc}") from exc
        if not boxes:
            return []
        try:
            shapes = self._shapes(image, boxes)
            vectors = self._encoder.compute_face_descriptor(image.pixels, shapes, self.config.num_jitters)
            return self._faces(image, boxes, scores, shapes, np.asarray(vectors))
        except Exception as exc:
            raise RecordError("embed", f"{type(exc).__name__}: {exc}") from exc

    def _detect(self, image: DecodedImage) -> tuple[list[Box], list[float]]:
        """Boxes (x1, y1, x2, y2 in original pixels) and scores, best first, size-filtered."""
        small, scale = downscale(image, self.config.detect_max_side)
        cfg = self.config
        if cfg.detector == "cnn":
            found = [(d.rect, d.confidence) for d in self._cnn(small, cfg.upsample)]
            found = [(r.left(), r.top(), r.right(), r.bottom(), s) for r, s in found]
        else:
            return self._hog_boxes(small, scale)
        return self._kept(found, scale)

    def _hog_boxes(self, small: np.ndarray, scale: float) -> tuple[list[Box], list[float]]:
        cfg = self.config
        rects, scores, _ = self._hog.run(small, cfg.upsample, cfg.det_threshold)
        found = [(r.left(), r.top(), r.right(), r.bottom(), s) for r, s in zip(rects, scores, strict=True)]
        return self._kept(found, scale, thresholded=True)

    def _kept(self, found, scale: float, thresholded: bool = False) -> tuple[list[Box], list[float]]:
        """dlib rectangles (inclusive right and bottom) with scores, as boxes in original pixels,
        best first, without those below the threshold, the minimum size, or past max_faces."""
        cfg = self.config
        if not thresholded:  # HOG applies det_threshold itself; MMOD's confidence is filtered here
            found = [f for f in found if f[4] >= cfg.det_threshold]
        found = sorted(found, key=lambda f: -f[4])
        boxes, kept = [], []
        for left, top, right, bottom, score in found:
            box = (left / scale, top / scale, (right + 1) / scale, (bottom + 1) / scale)
            if min(box[2] - box[0], box[3] - box[1]) < cfg.min_face_size:
                continue
            boxes.append(box)
            kept.append(float(score))
        if cfg.max_faces:
            boxes, kept = boxes[: cfg.max_faces], kept[: cfg.max_faces]
        return boxes, kept

    def _shapes(self, image: DecodedImage, boxes: list[Box]):
        dlib = self._dlib
        shapes = dlib.full_object_detections()
        for x1, y1, x2, y2 in boxes:
            rect = dlib.rectangle(round(x1), round(y1), round(x2) - 1, round(y2) - 1)
            shapes.append(self._landmarks(image.pixels, rect))
        return shapes

    def _faces(self, image: DecodedImage, boxes, scores, shapes, vectors: np.ndarray) -> list[Face]:
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

    # --- onnx runtime: the batch together ------------------------------------------------------

    def _analyze_batch(self, images: Sequence[DecodedImage]) -> list[list[Face]]:
        """Detect every image (MMOD: same-size copies together), then embed the chips of all
        images in runs of embed_batch_size; a failure is a RecordError for the batch, which the
        stage retries image by image, as with the dlib runtime."""
        try:
            found = self._detect_all(images)
        except FatalError:
            raise
        except Exception as exc:
            raise RecordError("detect", f"{type(exc).__name__}: {exc}") from exc
        try:
            shapes = [
                self._shapes(image, boxes) if boxes else []
                for image, (boxes, _) in zip(images, found, strict=True)
            ]
            chips = [self._chips(image, s) for image, s in zip(images, shapes, strict=True)]
            vectors = self._nets.embed(chips)
        except FatalError:
            raise
        except Exception as exc:
            raise RecordError("embed", f"{type(exc).__name__}: {exc}") from exc
        out = []
        for image, (boxes, scores), image_shapes, image_vectors in zip(
            images, found, shapes, vectors, strict=True
        ):
            out.append(self._faces(image, boxes, scores, image_shapes, image_vectors) if boxes else [])
        return out

    def _detect_all(self, images: Sequence[DecodedImage]) -> list[tuple[list[Box], list[float]]]:
        smalls = [downscale(image, self.config.detect_max_side) for image in images]
        if self.config.detector != "cnn":
            return [self._hog_boxes(small, scale) for small, scale in smalls]
        detections = self._nets.detect([small for small, _ in smalls], self.config.upsample)
        return [self._kept(found, scale) for found, (_, scale) in zip(detections, smalls, strict=True)]

    def _chips(self, image: DecodedImage, shapes) -> np.ndarray:
        if not shapes:
            return np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
        chips = self._dlib.get_face_chips(image.pixels, shapes, size=CHIP_SIZE, padding=CHIP_PADDING)
        return np.stack([np.asarray(chip, dtype=np.uint8) for chip in chips])
