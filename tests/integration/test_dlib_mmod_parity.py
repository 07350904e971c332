"""dlib's MMOD face detector on ONNX Runtime against dlib's own, on the shared photos.

The graph is built from the installed ``mmod_human_face_detector.dat``; dlib runs the same file.
dlib's CNN takes about a second a 512 px photo on two cores, so its answers are computed once per
session (a dozen photos at 512 px, three small ones upsampled once) and every test compares to them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
dlib = pytest.importorskip("dlib")

from pipelines.core.decode import decode_image, downscale  # noqa: E402
from pipelines.core.models.dlib_backend import weight_file  # noqa: E402
from pipelines.core.models.dlib_dat import read_network  # noqa: E402
from pipelines.core.models.dlib_mmod import MmodDetector, build_mmod_graph, check_mmod_network  # noqa: E402

DETECTOR_FILE = "mmod_human_face_detector.dat"
PHOTOS = 12
SMALL = ("couple.jpg", "img1.jpg", "img12.jpg")  # upsampled once, from 200 px copies
SCORE_TOLERANCE = 1e-4


def _photo(path, side: int) -> np.ndarray:
    small, _ = downscale(decode_image(path.read_bytes(), 100_000_000), side)
    return np.ascontiguousarray(small)


@pytest.fixture(scope="session")
def mmod_network():
    return read_network(weight_file(DETECTOR_FILE))


@pytest.fixture(scope="session")
def mmod_session(mmod_network):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    model = build_mmod_graph(mmod_network)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def mmod_cases(faces_dir):
    """(name, image, upsample, dlib's detections) for each case, dlib's run once per session."""
    cnn = dlib.cnn_face_detection_model_v1(weight_file(DETECTOR_FILE))
    photos = sorted(faces_dir.glob("*.jpg"))
    chosen = [(p, 512, 0) for p in photos[:: len(photos) // PHOTOS][:PHOTOS]]
    chosen += [(faces_dir / name, 200, 1) for name in SMALL]
    cases = []
    for path, side, upsample in chosen:
        image = _photo(path, side)
        found = [
            (d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.confidence)
            for d in cnn(image, upsample)
        ]
        cases.append((path.name, image, upsample, found))
    return cases


def _centre(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    top, left = (image.shape[0] - rows) // 2, (image.shape[1] - cols) // 2
    return np.ascontiguousarray(image[top : top + rows, left : left + cols])


def _assert_same(name, got, expected, tolerance=SCORE_TOLERANCE):
    assert [d[:4] for d in got] == [d[:4] for d in expected], name
    diffs = [abs(g[4] - e[4]) for g, e in zip(got, expected, strict=True)]
    assert max(diffs, default=0.0) <= tolerance, (name, diffs)


def test_boxes_and_scores_match_dlib(mmod_session, mmod_cases):
    detector = MmodDetector(mmod_session)
    assert sum(len(found) for *_, found in mmod_cases) >= len(mmod_cases)  # faces, not empty lists
    for name, image, upsample, expected in mmod_cases:
        assert image.shape[:2] != (0, 0) and max(image.shape[:2]) == (512 if upsample == 0 else 200)
        _assert_same(f"{name} upsample {upsample}", detector.detect([image], upsample)[0], expected)


def test_batches_give_what_single_images_give(mmod_session, mmod_cases):
    """Same-size images share batches (split by max_batch), other sizes run apart, and the
    answers come back in input order."""
    images = [image for _, image, upsample, found in mmod_cases if upsample == 0 and found]
    rows, cols = min(im.shape[0] for im in images), min(im.shape[1] for im in images)
    same = [_centre(image, rows, cols) for image in images[:5]]
    mixed = [same[0], images[1], same[1], same[2], images[3], same[3], same[4]]
    assert len({im.shape for im in mixed}) > 1
    detector = MmodDetector(mmod_session, max_batch=2)
    alone = [detector.detect([image])[0] for image in mixed]
    assert all(alone)  # every one has a face: the comparison is not between empty lists
    together = detector.detect(mixed)
    for i, (a, b) in enumerate(zip(together, alone, strict=True)):
        _assert_same(f"image {i}", a, b, tolerance=1e-6)  # the same graph: float noise at most


def test_builder_refuses_other_networks(mmod_network):
    descriptor = read_network(weight_file("dlib_face_recognition_resnet_model_v1.dat"))
    with pytest.raises(ValueError, match="loss layer is loss_metric_2"):
        build_mmod_graph(descriptor)
    layers = mmod_network.layers
    strided = dataclasses.replace(layers[3], fields=layers[3].fields | {"stride_y": 1, "stride_x": 1})
    with pytest.raises(ValueError, match=r"layer 3 above the input \(con_4 at byte \d+\).*stride 1x1"):
        build_mmod_graph(dataclasses.replace(mmod_network, layers=layers[:3] + [strided] + layers[4:]))
    with pytest.raises(ValueError, match="layer 1 above the input.*expected a batch norm.*found relu"):
        check_mmod_network(dataclasses.replace(mmod_network, layers=[layers[0]] + layers[2:] + [layers[1]]))
    with pytest.raises(ValueError, match="18 layers, expected 19"):
        check_mmod_network(dataclasses.replace(mmod_network, layers=layers[:-1]))


def test_bad_or_oversized_images_are_refused_and_tiny_ones_find_nothing(mmod_session, mmod_cases):
    detector = MmodDetector(mmod_session, max_pixels=1_000_000)
    image = mmod_cases[0][1]  # 512 px: about 0.4 M tiled pixels, 1.6 M once upsampled
    assert detector.detect([image], 0)[0]
    with pytest.raises(ValueError, match="beyond the detector's budget"):
        detector.detect([image], 1)
    for bad in (image.astype(np.float32), image[..., 0], image[..., :2], [[1, 2, 3]]):
        with pytest.raises(ValueError, match="uint8 RGB"):
            detector.detect([bad])
    # dlib itself fails on these (its convolutions refuse them, or worse); here they find nothing
    tiny = [np.zeros((0, 0, 3), np.uint8), np.full((1, 1, 3), 128, np.uint8), image[:9, :7].copy()]
    assert detector.detect(tiny, 0) == [[], [], []]


def test_a_graph_without_the_networks_spec_is_refused(mmod_network):
    model = build_mmod_graph(mmod_network)
    del model.metadata_props[:]  # the means, tiling, window and NMS thresholds travel there
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="not built by build_mmod_graph"):
        MmodDetector(session)
