"""Our batched SCRFD and ArcFace pipeline against insightface's own model_zoo classes.

Both run the same generated graphs (tests/onnx_models.py) on the shared photos, of many sizes;
ours in batches of 1, 7 and 32 and through graphs that batch natively, batch once their batch
dimension is freed, or must run one by one. Boxes, scores, keypoints and embeddings must agree
to float tolerance: the comparison is about identical pre- and post-processing.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
insightface = pytest.importorskip("insightface")

from insightface.model_zoo.arcface_onnx import ArcFaceONNX  # noqa: E402
from insightface.model_zoo.scrfd import SCRFD  # noqa: E402
from insightface.utils import face_align  # noqa: E402

from pipelines.core.config import ModelConfig  # noqa: E402
from pipelines.core.decode import decode_image  # noqa: E402
from pipelines.core.models.insightface_align import align, crop_faces, similarity_transforms  # noqa: E402
from pipelines.core.models.insightface_backend import build_detector, build_embedder  # noqa: E402
from pipelines.core.models.onnx_session import SessionOptions  # noqa: E402
from tests.onnx_models import arcface_model, scrfd_model  # noqa: E402

INPUT = 640
MAX_FACES = 12  # per image, for the embedding comparisons: enough faces, bounded time


@pytest.fixture(scope="module")
def photos(faces_dir) -> list[np.ndarray]:
    """Every shared photo as upright RGB, at its own size."""
    images = [decode_image(p.read_bytes(), 100_000_000).pixels for p in sorted(faces_dir.glob("*.jpg"))]
    assert len({im.shape for im in images}) > 20
    return images


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity-models")
    return {
        "det-dynamic": scrfd_model(folder / "det-dynamic.onnx", batch="dynamic"),
        "det-fixed": scrfd_model(folder / "det-fixed.onnx", batch="fixed"),
        "det-mixing": scrfd_model(folder / "det-mixing.onnx", batch="mixing"),
        "det-minor": scrfd_model(folder / "det-minor.onnx", batch="minor"),
        "rec": arcface_model(folder / "rec.onnx"),
        "rec-fixed": arcface_model(folder / "rec-fixed.onnx", batch="fixed"),
        "rec-mxnet": arcface_model(folder / "rec-mxnet.onnx", mxnet=True),
    }


@pytest.fixture(scope="module")
def reference(photos, models):
    """insightface's SCRFD at 640x640 on every photo (it takes BGR): (boxes+scores [n, 5], kps [n, 5, 2])."""
    detector = SCRFD(model_file=str(models["det-dynamic"]), session=_reference_session(models["det-dynamic"]))
    return [
        detector.detect(np.ascontiguousarray(p[:, :, ::-1]), input_size=(INPUT, INPUT), det_thresh=0.5)
        for p in photos
    ]


def our_sessions() -> SessionOptions:
    """Our sessions on the providers FACEAUDIT_TEST_PROVIDERS names (``make test-gpu``: cuda), CPU last."""
    names = [n for n in os.environ.get("FACEAUDIT_TEST_PROVIDERS", "").split(",") if n and n != "cpu"]
    return SessionOptions(providers=[*names, "cpu"])


def _reference_session(path):
    """insightface's reference classes always on the CPU: with onnxruntime-gpu installed they would
    pick CUDA by themselves, and the parity is ours on a provider against theirs on the CPU."""
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _detector(path, batch: int):
    config = ModelConfig(backend="insightface", det_size=INPUT, det_batch_size=batch)
    return build_detector(path, our_sessions(), config)


def _assert_same_detections(ours, theirs):
    assert len(ours) == len(theirs)
    total = 0
    for mine, (det, kps) in zip(ours, theirs, strict=True):
        assert len(mine.boxes) == len(det)
        np.testing.assert_allclose(mine.boxes, det[:, :4], rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(mine.scores, det[:, 4], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mine.landmarks, kps, rtol=1e-5, atol=1e-3)
        total += len(det)
    assert total > 100, "the generated detector should find boxes on the photos"
    assert sum(len(d) == 0 for d, _ in theirs) > 3, "and find nothing on some"


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_batched_detection_matches_insightface(photos, models, reference, batch):
    detector = _detector(models["det-dynamic"], batch)
    assert detector.runner.batched and detector.runner.layout == "lead"
    _assert_same_detections(detector.detect(photos), reference)


@pytest.mark.parametrize(
    "kind, batched, layout",
    [("det-fixed", True, "major"), ("det-minor", True, "minor"), ("det-mixing", False, "major")],
)
def test_batch_one_graphs_are_batched_or_run_one_by_one_transparently(
    photos, models, reference, kind, batched, layout
):
    detector = _detector(models[kind], 7)
    assert (detector.runner.batched, detector.runner.layout) == (batched, layout)
    _assert_same_detections(detector.detect(photos), reference)


def test_similarity_transforms_match_insightface_estimate_norm():
    rng = np.random.default_rng(3)
    landmarks = []
    for _ in range(300):
        scale, angle = rng.uniform(0.2, 8), rng.uniform(-np.pi, np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = (
            (face_align.arcface_dst - 56) @ rot.T * scale + rng.uniform(0, 3000, 2) + rng.normal(0, 4, (5, 2))
        )
        if rng.random() < 0.2:
            points[:, 0] *= -1  # mirrored faces: no rotation fits, the estimate must still agree
        landmarks.append(points.astype(np.float32))
    ours = similarity_transforms(np.stack(landmarks))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-image's estimate(), as insightface calls it
        theirs = np.stack([face_align.estimate_norm(p, 112) for p in landmarks])
    # scikit-image keeps some float32 steps: translations of thousands of pixels agree to ~1e-4 px
    np.testing.assert_allclose(ours[:, :, :2], theirs[:, :, :2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours[:, :, 2], theirs[:, :, 2], rtol=1e-6, atol=1e-3)


def test_crops_match_norm_crop_within_one_grey_level(photos, reference):
    for pixels, (_, kps) in zip(photos[:24], reference[:24], strict=True):
        if not len(kps):
            continue
        kps = kps[:MAX_FACES]
        ours = crop_faces(pixels, similarity_transforms(kps))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            theirs = np.stack([face_align.norm_crop(pixels, k) for k in kps])
        diff = np.abs(ours.astype(int) - theirs.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@pytest.mark.parametrize("kind", ["rec", "rec-fixed", "rec-mxnet"])
def test_embeddings_match_arcface_onnx(photos, models, reference, kind):
    embedder = build_embedder(models[kind], our_sessions(), batch_size=32)
    theirs_model = ArcFaceONNX(model_file=str(models[kind]), session=_reference_session(models[kind]))
    images = [(p, kps[:MAX_FACES]) for p, (_, kps) in zip(photos, reference, strict=True) if len(kps)]
    ours = embedder.embed(align([p for p, _ in images], [k for _, k in images]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        crops = [
            face_align.norm_crop(np.ascontiguousarray(p[:, :, ::-1]), k) for p, kps in images for k in kps
        ]
    step = 1 if kind == "rec-fixed" else 32  # insightface runs a batch-1 graph a crop at a time
    theirs = np.concatenate([theirs_model.get_feat(crops[i : i + step]) for i in range(0, len(crops), step)])
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    assert ours.shape == theirs.shape and len(ours) > 100
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)
    # crops differ by one grey level on a few pixels (remap vs warpAffine rounding): nearly equal vectors
    assert np.min(np.sum(ours * theirs, axis=1)) > 0.9999
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    # and on identical crops, identical vectors
    rgb = np.stack([c[:, :, ::-1] for c in crops[:64]])
    np.testing.assert_allclose(embedder.embed(rgb), theirs[:64], rtol=1e-4, atol=1e-5)
