"""SCRFD face detection on batches: letterbox, one run per batch, vectorised anchor decoding, NMS.

Pre- and post-processing follow insightface's ``model_zoo.SCRFD`` step for step (same resize,
same top-left letterbox, same anchor order, same float32 arithmetic, same greedy NMS with its
"+1" box areas), so that the same graph gives the same boxes; tests/unit/test_insightface_parity.py
holds it to that. What differs is the batching: every image of a batch is letterboxed into one
uint8 array and run at once, and the anchors of all images are decoded together.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from ..errors import FatalError
from .onnx_session import Runner

# Output count -> (strides, anchors per location, keypoints?), as insightface's SCRFD reads them.
LAYOUTS = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}
MEAN, STD = 127.5, 128.0  # SCRFD's input normalisation


@dataclass
class Detections:
    """One image's faces, best first, in original pixels."""

    boxes: np.ndarray  # float32 [n, 4]: x1, y1, x2, y2
    scores: np.ndarray  # float32 [n]
    landmarks: np.ndarray  # float32 [n, 5, 2]


def scrfd_layout(n_outputs: int) -> tuple[tuple[int, ...], int]:
    """Strides and anchors per location of an SCRFD graph with ``n_outputs`` outputs."""
    if n_outputs not in LAYOUTS:
        raise FatalError(f"an SCRFD detector has 6, 9, 10 or 15 outputs, not {n_outputs}")
    strides, anchors, kps = LAYOUTS[n_outputs]
    if not kps:
        raise FatalError("the detector gives no keypoints; faces cannot be aligned without them")
    return strides, anchors


def letterbox_size(height: int, width: int, in_w: int, in_h: int) -> tuple[int, int, float]:
    """(new width, new height, scale): the image fitted into the input, aspect kept (insightface's rule)."""
    im_ratio = float(height) / width
    if im_ratio > float(in_h) / in_w:
        new_h = in_h
        new_w = int(new_h / im_ratio)
    else:
        new_w = in_w
        new_h = int(new_w * im_ratio)
    new_w, new_h = max(new_w, 1), max(new_h, 1)  # a 1x5000 strip would otherwise vanish
    return new_w, new_h, float(new_h) / height


def letterbox(images: list[np.ndarray], in_w: int, in_h: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [batch, in_h, in_w, 3] with each image resized into its top-left corner, and the scales."""
    batch = np.zeros((len(images), in_h, in_w, 3), dtype=np.uint8)
    scales = np.empty(len(images), dtype=np.float32)
    for i, pixels in enumerate(images):
        new_w, new_h, scales[i] = letterbox_size(pixels.shape[0], pixels.shape[1], in_w, in_h)
        batch[i, :new_h, :new_w] = cv2.resize(pixels, (new_w, new_h))
    return batch, scales


@lru_cache(maxsize=64)
def anchor_centers(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
    """float32 [height * width * anchors, 2]: x, y of each anchor, row by row, anchors innermost."""
    ys, xs = np.mgrid[:height, :width]
    centers = np.stack([xs, ys], axis=-1).astype(np.float32)
    centers = (centers * stride).reshape(-1, 2)
    if anchors > 1:
        centers = np.repeat(centers, anchors, axis=0)
    centers.flags.writeable = False
    return centers


@dataclass
class Candidates:
    """Boxes above the score threshold, over a whole batch, before NMS."""

    image: np.ndarray  # int [k]: which image of the batch
    boxes: np.ndarray  # float32 [k, 4], original pixels
    scores: np.ndarray  # float32 [k]
    landmarks: np.ndarray  # float32 [k, 5, 2]


def decode(
    outputs: list[np.ndarray],
    scales: np.ndarray,
    in_w: int,
    in_h: int,
    strides,
    anchors: int,
    threshold: float,
) -> Candidates:
    """Anchor decoding of SCRFD's outputs ([batch, anchors, k] each: scores, then boxes, then keypoints),
    sorted by image and then by decreasing score (stable, so ties keep insightface's order)."""
    n = len(strides)
    parts = []
    for level, stride in enumerate(strides):
        scores = outputs[level].reshape(len(scales), -1)
        image, anchor = np.nonzero(scores >= threshold)
        centers = anchor_centers(in_h // stride, in_w // stride, stride, anchors)[anchor]
        box = outputs[level + n].reshape(len(scales), -1, 4)[image, anchor] * stride
        kps = outputs[level + 2 * n].reshape(len(scales), -1, 10)[image, anchor] * stride
        boxes = np.concatenate([centers - box[:, :2], centers + box[:, 2:]], axis=1)
        points = np.tile(centers, 5) + kps
        parts.append((image, boxes, scores[image, anchor], points))
    image, boxes, scores, points = (np.concatenate(p) for p in zip(*parts, strict=True))
    scale = scales[image][:, np.newaxis]  # float32, so the division is insightface's float32 one
    order = np.lexsort((-scores, image))
    return Candidates(
        image=image[order],
        boxes=(boxes / scale).astype(np.float32)[order],
        scores=scores.astype(np.float32)[order],
        landmarks=(points / scale).astype(np.float32)[order].reshape(-1, 5, 2),
    )


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression, insightface's variant (pixel-inclusive "+1" areas).

    ``boxes`` must be sorted by decreasing score. One iteration per kept box, each vectorised over
    the boxes still in play: the greedy order is what makes it NMS, so it cannot be one array op.
    """
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def split_by_image(found: Candidates, batch: int, nms_threshold: float) -> list[Detections]:
    """NMS within each image (candidates of one image are contiguous, best first)."""
    bounds = np.searchsorted(found.image, np.arange(batch + 1))
    out = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        keep = start + nms(found.boxes[start:end], found.scores[start:end], nms_threshold)
        out.append(Detections(found.boxes[keep], found.scores[keep], found.landmarks[keep]))
    return out


class ScrfdDetector:
    """SCRFD on batches of RGB uint8 images of any sizes."""

    def __init__(
        self,
        runner: Runner,
        n_outputs: int,
        input_size: tuple[int, int],
        threshold: float = 0.5,
        nms_threshold: float = 0.4,
        batch_size: int = 16,
    ):
        self.runner = runner
        self.strides, self.anchors = scrfd_layout(n_outputs)
        self.in_w, self.in_h = input_size
        self.threshold, self.nms_threshold, self.batch_size = threshold, nms_threshold, batch_size

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        out: list[Detections] = []
        for start in range(0, len(images), self.batch_size):
            out += self._detect_batch(images[start : start + self.batch_size])
        return out

    def _detect_batch(self, images: list[np.ndarray]) -> list[Detections]:
        pixels, scales = letterbox(images, self.in_w, self.in_h)
        outputs = self.runner.run(pixels)
        found = decode(outputs, scales, self.in_w, self.in_h, self.strides, self.anchors, self.threshold)
        return split_by_image(found, len(images), self.nms_threshold)
