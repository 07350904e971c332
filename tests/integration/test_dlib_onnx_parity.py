"""dlib's face descriptor on ONNX Runtime against dlib itself, on the real weights and photos.

dlib's side is computed once per session (its descriptor costs ~70 ms a face here): every face the
HOG detector finds on the test photos, its landmarks and dlib's own descriptor from
``compute_face_descriptor(pixels, shapes)``, the call the dlib runtime makes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pipelines.core.config import DecodeConfig, ModelConfig
from pipelines.core.decode import decode_image
from pipelines.core.errors import FatalError
from pipelines.core.models import load_model
from pipelines.core.models.dlib_backend import DLIB_MATCH_THRESHOLD, RESNET_FILE, weight_file
from pipelines.core.models.dlib_dat import read_network
from pipelines.core.models.dlib_onnx import CACHE_SUBDIR, graph_bytes, open_dlib_session, session_options
from pipelines.core.models.dlib_resnet_onnx import INPUT, TopologyError, build_resnet_graph

dlib = pytest.importorskip("dlib")

PAIR_FILES = ("master.csv", "face-recognition-pivot.csv")
TOLERANCE = 1e-5


@pytest.fixture(scope="session")
def photos(faces_dir) -> dict[str, object]:
    limit = DecodeConfig().max_pixels
    return {p.name: decode_image(p.read_bytes(), limit) for p in sorted(faces_dir.glob("*.jpg"))}


@pytest.fixture(scope="session")
def dlib_side(photos):
    """Per photo: the dlib runtime's faces, their face chips and dlib's raw descriptors."""
    model = load_model(ModelConfig(runtime="dlib"))
    encoder = dlib.face_recognition_model_v1(weight_file(RESNET_FILE))
    out = {}
    for name, image in photos.items():
        # the steps of the dlib runtime's analyze, keeping the raw descriptors it normalises
        boxes, scores = model._detect(image)
        shapes = model._shapes(image, boxes)
        raw = np.asarray(encoder.compute_face_descriptor(image.pixels, shapes), np.float32).reshape(-1, 128)
        faces = model._faces(image, boxes, scores, shapes, raw.copy()) if boxes else []
        out[name] = (faces, model._chips(image, shapes), raw)
    return out


@pytest.fixture(scope="session")
def onnx_session(tmp_path_factory):
    cache = tmp_path_factory.mktemp("dlib-onnx-cache")
    graph = graph_bytes(weight_file(RESNET_FILE), "dlib_resnet_v1", build_resnet_graph, cache)
    return open_dlib_session(graph, session_options(["cpu"], 0, cache))


def _run(session, chips: np.ndarray, batch: int) -> np.ndarray:
    parts = [session.run(None, {INPUT: chips[i : i + batch]})[0] for i in range(0, len(chips), batch)]
    return np.concatenate(parts)


@pytest.mark.parametrize("batch", [1, 32])
def test_the_descriptor_equals_dlibs_on_every_face(dlib_side, onnx_session, batch):
    chips = np.concatenate([chips for _, chips, _ in dlib_side.values()])
    expected = np.concatenate([raw for _, _, raw in dlib_side.values()])
    assert len(chips) >= 60, "the test photos should hold dozens of faces"
    got = _run(onnx_session, chips, batch)
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("batch", [1, 32])
def test_the_descriptor_equals_dlibs_on_random_and_constant_chips(onnx_session, batch):
    rng = np.random.default_rng(15)
    chips = [rng.integers(0, 256, (150, 150, 3), dtype=np.uint8) for _ in range(5)]
    chips += [np.full((150, 150, 3), value, np.uint8) for value in (0, 128, 255)]
    encoder = dlib.face_recognition_model_v1(weight_file(RESNET_FILE))
    expected = np.array([encoder.compute_face_descriptor(chip) for chip in chips], np.float32)
    got = _run(onnx_session, np.stack(chips), batch)
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.fixture(scope="session")
def onnx_faces(photos, tmp_path_factory):
    """The onnx runtime's faces of every photo, the whole set as one batch (chips of many images
    embedded together in runs of 16)."""
    cache = tmp_path_factory.mktemp("dlib-onnx-model-cache")
    model = load_model(ModelConfig(runtime="onnx", cache_dir=str(cache), embed_batch_size=16))
    return dict(zip(photos, model.analyze(list(photos.values())), strict=True)), model


def test_the_onnx_runtime_finds_the_same_faces_and_vectors(dlib_side, onnx_faces):
    faces, model = onnx_faces
    for name, (expected, _, _) in dlib_side.items():
        got = faces[name]
        assert len(got) == len(expected), name
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a.bbox, b.bbox)
            np.testing.assert_array_equal(a.landmarks, b.landmarks)
            assert np.abs(a.embedding - b.embedding).max() <= TOLERANCE
    assert model.provenance["runtime"] == "onnx" and model.provenance["providers"] == ["cpu"]
    assert len(model.provenance["onnx_sha256"]["dlib_resnet_v1"]) == 64


def _largest(faces) -> np.ndarray | None:
    if not faces:
        return None
    return max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])).embedding


@pytest.mark.parametrize("pairs_file", PAIR_FILES)
def test_the_pairs_get_the_same_decisions_on_both_runtimes(faces_dir, dlib_side, onnx_faces, pairs_file):
    with open(faces_dir / pairs_file, newline="") as f:
        rows = list(csv.DictReader(f))
    decided = 0
    for row in rows:
        x, y = Path(row["file_x"]).name, Path(row["file_y"]).name
        if x not in dlib_side or y not in dlib_side:
            continue
        ours = [_largest(onnx_faces[0][n]) for n in (x, y)]
        theirs = [_largest(dlib_side[n][0]) for n in (x, y)]
        if theirs[0] is None or theirs[1] is None:
            assert ours[0] is None or ours[1] is None
            continue
        same_ours = float(ours[0] @ ours[1]) >= DLIB_MATCH_THRESHOLD
        same_theirs = float(theirs[0] @ theirs[1]) >= DLIB_MATCH_THRESHOLD
        assert same_ours == same_theirs, (x, y)
        decided += 1
    assert decided >= 20


def test_the_graph_is_cached_by_the_files_sha256_and_a_damaged_entry_is_rebuilt(tmp_path):
    first = graph_bytes(weight_file(RESNET_FILE), "dlib_resnet_v1", build_resnet_graph, tmp_path)
    (entry,) = (tmp_path / CACHE_SUBDIR).iterdir()
    assert first.dat_sha256[:32] in entry.name and entry.read_bytes() == first.data
    entry.write_bytes(first.data[: len(first.data) // 2])
    again = graph_bytes(weight_file(RESNET_FILE), "dlib_resnet_v1", build_resnet_graph, tmp_path)
    assert again.sha256 == first.sha256 and entry.read_bytes() == first.data
    assert [p.name for p in (tmp_path / CACHE_SUBDIR).iterdir()] == [entry.name]  # no temporary left


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_dat_file_is_refused_at_load(tmp_path, damage):
    data = Path(weight_file(RESNET_FILE)).read_bytes()
    if damage == "truncated":
        data = data[: len(data) - 1000]
    else:  # the first convolution's name: a layer type dlib never wrote
        data = data.replace(b"\x05con_4", b"\x05con_x", 1)
    bad = tmp_path / RESNET_FILE
    bad.write_bytes(data)
    with pytest.raises(
        FatalError, match=r"dlib network file dlib_face_recognition_resnet_model_v1.dat .*at byte"
    ):
        graph_bytes(bad, "dlib_resnet_v1", build_resnet_graph, tmp_path / "cache")


def test_another_network_is_refused_naming_the_layer():
    mmod = read_network(weight_file("mmod_human_face_detector.dat"))
    with pytest.raises(TopologyError, match="not a face descriptor network"):
        build_resnet_graph(mmod)
    resnet = read_network(weight_file(RESNET_FILE))
    resnet.layers[40], resnet.layers[41] = resnet.layers[41], resnet.layers[40]
    with pytest.raises(TopologyError, match=r"layer 40 above the input \(\w+ at byte \d+\)"):
        build_resnet_graph(resnet)


def test_jitter_is_refused_on_the_onnx_runtime():
    with pytest.raises(FatalError, match="num_jitters 2 needs model.runtime: dlib"):
        load_model(ModelConfig(runtime="onnx", num_jitters=2))
