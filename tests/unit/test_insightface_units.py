"""The insightface backend's small parts: letterbox, NMS, runners, providers, packs, config."""

from __future__ import annotations

import hashlib
import types

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from pipelines.core import storage  # noqa: E402
from pipelines.core.config import ModelConfig, validate_job  # noqa: E402
from pipelines.core.errors import FatalError  # noqa: E402
from pipelines.core.models import load_model, model_id_for  # noqa: E402
from pipelines.core.models import onnx_session as sessions  # noqa: E402
from pipelines.core.models.insightface_backend import find_models, model_kind  # noqa: E402
from pipelines.core.models.insightface_detect import (  # noqa: E402
    anchor_centers,
    decode,
    letterbox,
    letterbox_size,
    nms,
)
from pipelines.core.models.insightface_pack import fetch_pack, open_pack, read_sums  # noqa: E402
from pipelines.core.records import DecodedImage  # noqa: E402
from tests.onnx_models import arcface_model, make_pack, scrfd_model, write_sha256sums  # noqa: E402

# --- letterbox, anchor decoding and NMS -------------------------------------------------------
# Expected values below are worked out by hand from insightface's rules (the arithmetic is in the
# comments), not computed with the detector's own formulas.


@pytest.mark.parametrize(
    "height, width, in_w, in_h, expected",
    [
        # taller than the input (100/50 = 2 > 64/64): height fills, width = int(64 / 2) = 32; 64/100
        (100, 50, 64, 64, (32, 64, 0.64)),
        # wider (30/90 = 1/3): width fills, height = int(64 / 3) = int(21.33) = 21; 21/30 = 0.7
        (30, 90, 64, 64, (64, 21, 0.7)),
        # 480x640 fits 640x640 exactly by width: 640 x 480, scale 1
        (480, 640, 640, 640, (640, 480, 1.0)),
        # square into 640 wide x 480 high (1 > 480/640): height fills, width = 480; 480/1000
        (1000, 1000, 640, 480, (480, 480, 0.48)),
        # smaller than the input: upscaled, 300/200 = 1.5 <= 640/320 = 2: width 320, height 480; 480/300
        (300, 200, 320, 640, (320, 480, 1.6)),
        # a strip: height = int(640 * 37 / 5000) = int(4.736) = 4; scale 4/37 (rows, not columns)
        (37, 5000, 640, 640, (640, 4, 4 / 37)),
        # a 1-pixel strip: height int(640 / 5000) = 0 would vanish, so 1; 1/1
        (1, 5000, 640, 640, (640, 1, 1.0)),
        # a 1-pixel column: width int(640 / 5000) = 0 -> 1; height 640; 640/5000
        (5000, 1, 640, 640, (1, 640, 0.128)),
    ],
)
def test_letterbox_size_hand_cases(height, width, in_w, in_h, expected):
    new_w, new_h, scale = letterbox_size(height, width, in_w, in_h)
    assert (new_w, new_h) == expected[:2]
    assert scale == pytest.approx(expected[2], rel=1e-12)


def test_letterbox_size_fits_every_shape_into_the_input():
    """Properties over many shapes: it fits, one side touches the input (unless clamped to one
    pixel), the aspect is kept to within one pixel of the side that was rounded down, and the scale
    maps original rows to letterboxed rows."""
    for height in range(1, 3000, 37):
        for width in (1, 2, 17, 640, 641, 1999, 5000):
            for in_w, in_h in ((640, 640), (640, 480), (320, 640)):
                new_w, new_h, scale = letterbox_size(height, width, in_w, in_h)
                assert 1 <= new_w <= in_w and 1 <= new_h <= in_h
                assert new_w == in_w or new_h == in_h or min(new_w, new_h) == 1
                if min(new_w, new_h) > 1:
                    # new_w / new_h == width / height up to the floor of one side
                    assert abs(new_w * height - new_h * width) <= max(height, width)
                assert round(height * scale) == new_h


def test_letterbox_puts_each_image_top_left_on_black():
    images = [np.full((100, 50, 3), 200, np.uint8), np.full((30, 90, 3), 100, np.uint8)]
    batch, scales = letterbox(images, 64, 64)
    assert batch.shape == (2, 64, 64, 3) and batch.dtype == np.uint8
    # 100 high x 50 wide -> 64 x 32 (see the hand cases): columns 0-31 image, 32-63 black
    assert (batch[0, :, :32] == 200).all() and (batch[0, :, 32:] == 0).all()
    # 30 high x 90 wide -> 21 x 64: rows 0-20 image, 21-63 black
    assert (batch[1, :21] == 100).all() and (batch[1, 21:] == 0).all()
    np.testing.assert_allclose(scales, [0.64, 0.7], rtol=1e-6)  # 64/100, 21/30


def test_anchor_centers_hand_case():
    # a 2x3 grid (2 rows, 3 columns) at stride 8, two anchors per location: row by row, x first
    centers = anchor_centers(2, 3, 8, 2)
    expected = [
        [0, 0], [0, 0], [8, 0], [8, 0], [16, 0], [16, 0],  # row 0
        [0, 8], [0, 8], [8, 8], [8, 8], [16, 8], [16, 8],  # row 1
    ]  # fmt: skip
    assert centers.tolist() == expected
    assert anchor_centers(1, 2, 32, 1).tolist() == [[0, 0], [32, 0]]


def test_decode_hand_case():
    """One stride-8 level of a 16x16 input: a 2x2 grid, two anchors per location, so 8 anchors with
    centres (0,0) (0,0) (8,0) (8,0) (0,8) (0,8) (8,8) (8,8). Distances are in strides."""
    scores = np.full((2, 8, 1), 0.1, np.float32)
    boxes = np.zeros((2, 8, 4), np.float32)
    kps = np.zeros((2, 8, 10), np.float32)
    # image 0, anchor 5 (centre 0,8), score 0.9: distances (1, .5, 2, 1.5) x 8 = (8, 4, 16, 12)
    # -> box (0-8, 8-4, 0+16, 8+12) = (-8, 4, 16, 20); letterbox scale 0.5 -> (-16, 8, 32, 40)
    scores[0, 5], boxes[0, 5] = 0.9, (1, 0.5, 2, 1.5)
    # key points (1,1) (2,2) (0,0) (-1,.5) (.25,-.5) x 8 + centre (0,8) = (8,16) (16,24) (0,8) (-8,12)
    # (2,4); / 0.5 -> (16,32) (32,48) (0,16) (-16,24) (4,8)
    kps[0, 5] = (1, 1, 2, 2, 0, 0, -1, 0.5, 0.25, -0.5)
    # image 0, anchor 2 (centre 8,0), score 0.6: distances .25 x 8 = 2 -> (6, -2, 10, 2) / 0.5
    # = (12, -4, 20, 4); key points all at the centre: (8,0) / 0.5 = (16, 0)
    scores[0, 2], boxes[0, 2] = 0.6, (0.25, 0.25, 0.25, 0.25)
    # image 1 (scale 1), anchor 0 (centre 0,0), score 0.7: distances 1 x 8 -> (-8, -8, 8, 8)
    scores[1, 0], boxes[1, 0] = 0.7, (1, 1, 1, 1)
    # a score just under the threshold is dropped
    scores[1, 7] = 0.49
    found = decode([scores, boxes, kps], np.array([0.5, 1.0], np.float32), 16, 16, (8,), 2, 0.5)
    assert found.image.tolist() == [0, 0, 1]  # by image, then best first
    np.testing.assert_allclose(found.scores, [0.9, 0.6, 0.7], rtol=1e-6)
    np.testing.assert_allclose(found.boxes, [[-16, 8, 32, 40], [12, -4, 20, 4], [-8, -8, 8, 8]], atol=1e-5)
    np.testing.assert_allclose(
        found.landmarks,
        [
            [[16, 32], [32, 48], [0, 16], [-16, 24], [4, 8]],
            [[16, 0]] * 5,
            [[0, 0]] * 5,
        ],
        atol=1e-5,
    )


# NMS with insightface's pixel-inclusive areas ((x2 - x1 + 1) * (y2 - y1 + 1)):
#   A (0,0,9,9): 10 x 10 = 100          D (0,0,9,8): 10 x 9 = 90, inside A: overlap 90/100 = 0.9
#   B (5,0,14,9): 100; with A: 5 x 10 = 50 shared, 50 / (100 + 100 - 50) = 1/3 (without the +1:
#     4 x 9 = 36 / (81 + 81 - 36) = 0.286); with D: 5 x 9 = 45 / (90 + 100 - 45) = 0.31
#   C (20,20,29,29): touches nothing
NMS_BOXES = np.array([[0, 0, 9, 9], [0, 0, 9, 8], [5, 0, 14, 9], [20, 20, 29, 29]], np.float32)  # A D B C
NMS_SCORES = np.array([0.9, 0.85, 0.8, 0.7], np.float32)


@pytest.mark.parametrize(
    "threshold, kept",
    [
        (0.4, [0, 2, 3]),  # D (0.9 with A) goes; B (1/3) stays
        (0.3, [0, 3]),  # B (1/3 > 0.3) goes too: only with the +1 areas (0.286 would stay)
        (0.95, [0, 1, 2, 3]),  # nothing overlaps that much
        (0.0, [0, 3]),  # any overlap suppresses
    ],
)
def test_nms_hand_cases(threshold, kept):
    assert nms(NMS_BOXES, NMS_SCORES, threshold).tolist() == kept


def test_nms_ties_keep_their_order_and_scores_decide():
    same = np.array([[0, 0, 9, 9]] * 3, np.float32)
    assert nms(same, np.array([0.5, 0.5, 0.5], np.float32), 0.4).tolist() == [0]  # the first of a tie
    assert nms(same, np.array([0.5, 0.7, 0.6], np.float32), 0.4).tolist() == [1]  # the best score
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.4).tolist() == []


def _insightface_nms(dets: np.ndarray, thresh: float) -> list[int]:
    from insightface.model_zoo.scrfd import SCRFD

    holder = types.SimpleNamespace(nms_thresh=thresh)
    return SCRFD.nms(holder, dets)


def test_nms_keeps_what_insightface_keeps():
    pytest.importorskip("insightface")
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(0, 60))
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(1, 80, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        scores = np.sort(rng.uniform(0.5, 1, n).astype(np.float32))[::-1]
        if trial % 5 == 0:
            scores[: n // 2] = 0.75  # ties keep their order
        thresh = float(rng.choice([0.0, 0.3, 0.4, 0.7]))
        ours = nms(boxes, scores, thresh)
        theirs = _insightface_nms(np.hstack([boxes, scores[:, None]]), thresh) if n else []
        assert ours.tolist() == list(theirs)


# --- runners and providers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def det_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runner")
    return {
        b: onnx.load(str(scrfd_model(folder / f"{b}.onnx", batch=b)))
        for b in ("dynamic", "fixed", "minor", "mixing")
    }


@pytest.mark.parametrize(
    "batch, batched, layout",
    [
        ("dynamic", True, "lead"),
        ("fixed", True, "major"),
        ("minor", True, "minor"),
        ("mixing", False, "major"),
    ],
)
def test_runner_gives_per_image_outputs_whatever_the_graph(det_models, batch, batched, layout):
    probe = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    model = sessions.with_pixel_input(det_models[batch], 127.5, 128.0)
    runner = sessions.load_runner(model, sessions.SessionOptions(), probe, max_batch=4)
    assert (runner.batched, runner.layout) == (batched, layout)
    images = np.random.default_rng(1).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    together = runner.run(images)
    for i in range(6):
        alone = runner.run(images[i : i + 1])
        for a, b in zip(together, alone, strict=True):
            assert a.shape[0] == 6 and a.shape[1] in (8 * 8 * 2, 4 * 4 * 2, 2 * 2 * 2)  # strides 8, 16, 32
            np.testing.assert_allclose(a[i : i + 1], b, rtol=1e-5, atol=1e-6)


def _identity_nchw_model():
    """A graph whose output is its NCHW float input, so that the wrapper's work can be read off."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 3, "h", "w"])
    graph = helper.make_graph([helper.make_node("Identity", ["input.1"], ["out"])], "identity", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_pixel_input_normalises_inside_the_graph():
    import onnxruntime as ort

    wrapped = sessions.with_pixel_input(_identity_nchw_model(), 127.5, 128.0)
    assert wrapped.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    session = ort.InferenceSession(wrapped.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.zeros((1, 2, 3, 3), np.uint8)  # NHWC: 2 rows, 3 columns, RGB
    pixels[...] = (0, 255, 128)
    pixels[0, 1, 2] = (127, 64, 200)
    (out,) = session.run(None, {"pixels": pixels})
    assert out.shape == (1, 3, 2, 3) and out.dtype == np.float32  # NCHW
    # (p - 127.5) / 128, exact in float32: 0 -> -0.99609375, 255 -> 0.99609375, 128 -> 0.00390625,
    # 127 -> -0.00390625, 64 -> -63.5/128 = -0.49609375, 200 -> 72.5/128 = 0.56640625
    for channel, everywhere, at_1_2 in (
        (0, -0.99609375, -0.00390625),
        (1, 0.99609375, -0.49609375),
        (2, 0.00390625, 0.56640625),
    ):
        expected = np.full((2, 3), everywhere, np.float32)
        expected[1, 2] = at_1_2
        np.testing.assert_array_equal(out[0, channel], expected)


def test_pixel_input_keeps_the_rest_of_the_graph(det_models):
    """The wrapped detector on pixels gives what the plain one gives on the wrapper's own blob."""
    import onnxruntime as ort

    def session(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    pixels = np.random.default_rng(2).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    (blob,) = session(sessions.with_pixel_input(_identity_nchw_model(), 127.5, 128.0)).run(
        None, {"pixels": pixels}
    )
    model = det_models["dynamic"]
    ours = session(sessions.with_pixel_input(model, 127.5, 128.0)).run(None, {"pixels": pixels})
    plain = session(model).run(None, {"input.1": blob})
    for a, b in zip(ours, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_provider_names_are_refused():
    with pytest.raises(FatalError, match="unknown"):
        sessions.provider_names(["cuda", "rocm"])
    with pytest.raises(FatalError, match="unknown or no"):
        sessions.provider_names([])


def test_missing_gpu_provider_is_an_error_that_says_why():
    with pytest.raises(FatalError, match=r"CUDAExecutionProvider.*offers only.*onnxruntime-gpu"):
        sessions.check_available(["cuda", "cpu"], ["CPUExecutionProvider"])
    sessions.check_available(["tensorrt", "cuda"], ["TensorrtExecutionProvider", "CUDAExecutionProvider"])


def test_tensorrt_settings_come_from_config():
    options = sessions.SessionOptions(providers=["tensorrt", "cuda"], trt_cache="/cache/trt", fp16=True)
    profile = ("pixels:1x640x640x3", "pixels:16x640x640x3", "pixels:16x640x640x3")
    (trt, trt_opts), (cuda, _) = sessions.provider_list(options, profile)
    assert (trt, cuda) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert trt_opts["trt_fp16_enable"] is True and trt_opts["trt_engine_cache_path"] == "/cache/trt"
    assert trt_opts["trt_profile_max_shapes"] == "pixels:16x640x640x3"


def test_a_session_that_lost_its_gpu_provider_is_refused(monkeypatch):
    """ONNX Runtime runs on the CPU when CUDA fails to load; we must not."""

    class Session:
        def __init__(self, *args, **kwargs):
            pass

        def get_providers(self):
            return ["CPUExecutionProvider"]

    fake = types.SimpleNamespace(
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        SessionOptions=lambda: types.SimpleNamespace(),
        InferenceSession=Session,
    )
    monkeypatch.setattr(sessions, "import_ort", lambda: fake)
    with pytest.raises(FatalError, match="could not start.*CUDAExecutionProvider"):
        sessions.open_session(b"", sessions.SessionOptions(providers=["cuda"]))


def test_loading_the_backend_with_a_gpu_provider_here_fails_loudly(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA")
    config = ModelConfig(backend="insightface", pack=str(make_pack(tmp_path / "pack")), providers=["cuda"])
    with pytest.raises(FatalError, match="requested but this ONNX Runtime offers only"):
        load_model(config)


# --- packs -----------------------------------------------------------------------------------


def test_read_sums_takes_sha256sum_output():
    digest = "ab" * 32
    assert read_sums(f"# list\n{digest}  det.onnx\n{digest.upper()} *sub/rec.onnx\n\n") == {
        "det.onnx": digest,
        "rec.onnx": digest,
    }
    with pytest.raises(FatalError, match="sha256sum"):
        read_sums("nonsense det.onnx\n")


def test_pack_from_a_folder_is_verified_and_described(tmp_path):
    folder = make_pack(tmp_path / "tiny")
    (folder / "LICENSE").write_text("research only\n")
    info = open_pack(ModelConfig(backend="insightface", pack=str(folder), pack_license="research only"))
    assert info.name == "tiny" and info.license == "research only"
    assert info.files["det.onnx"] == hashlib.sha256((folder / "det.onnx").read_bytes()).hexdigest()
    assert info.license_file.startswith("LICENSE sha256:")
    assert find_models(folder) == (folder / "det.onnx", folder / "rec.onnx")


def test_a_changed_model_file_is_refused(tmp_path):
    folder = make_pack(tmp_path / "tiny")
    data = bytearray((folder / "rec.onnx").read_bytes())
    data[-1] ^= 1
    (folder / "rec.onnx").write_bytes(bytes(data))
    with pytest.raises(FatalError, match=r"different content \['rec.onnx'\]"):
        open_pack(ModelConfig(backend="insightface", pack=str(folder)))
    with pytest.raises(FatalError, match="does not match its sha256 list"):
        load_model(ModelConfig(backend="insightface", pack=str(folder)))


def test_an_unlisted_model_file_and_a_missing_list_are_refused(tmp_path):
    folder = make_pack(tmp_path / "tiny")
    arcface_model(folder / "extra.onnx")
    with pytest.raises(FatalError, match=r"not listed \['extra.onnx'\]"):
        open_pack(ModelConfig(backend="insightface", pack=str(folder)))
    (folder / "SHA256SUMS").unlink()
    with pytest.raises(FatalError, match="sha256sum"):
        open_pack(ModelConfig(backend="insightface", pack=str(folder)))
    sums = tmp_path / "vetted.sha256"
    sums.write_text(write_sha256sums(folder).read_text())
    assert open_pack(ModelConfig(backend="insightface", pack=str(folder), pack_sha256=str(sums))).files


def test_named_packs_live_under_the_pack_root(tmp_path):
    make_pack(tmp_path / "models" / "tiny")
    config = ModelConfig(backend="insightface", pack="tiny", pack_root=str(tmp_path / "models"))
    assert open_pack(config).folder == tmp_path / "models" / "tiny"
    with pytest.raises(FatalError, match="not in .*docs/insightface.md"):
        open_pack(ModelConfig(backend="insightface", pack="buffalo_l", pack_root=str(tmp_path / "models")))


def test_remote_packs_are_copied_to_the_cache_then_verified(tmp_path):
    """gs:// goes through the same fsspec layer; memory:// stands in for it here."""
    local = make_pack(tmp_path / "tiny")
    remote = "memory://bucket/packs/tiny"
    for path in local.iterdir():
        storage.write_atomic(storage.join(remote, path.name), path.read_bytes())
    folder = fetch_pack(remote, tmp_path / "cache" / "packs")
    assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS", "det.onnx", "rec.onnx"]
    info = open_pack(ModelConfig(backend="insightface", pack=remote, cache_dir=str(tmp_path / "cache")))
    assert info.folder == folder and info.name == "tiny"


def test_model_kinds_follow_insightfaces_router(tmp_path):
    assert model_kind(onnx.load(str(scrfd_model(tmp_path / "d.onnx")))) == "detection"
    assert model_kind(onnx.load(str(arcface_model(tmp_path / "r.onnx")))) == "recognition"
    make_pack(tmp_path / "two")
    arcface_model(tmp_path / "two" / "rec2.onnx", seed=5)
    with pytest.raises(FatalError, match="exactly one recognition"):
        find_models(tmp_path / "two")


# --- config and model ------------------------------------------------------------------------


def test_insightface_config_defaults():
    config = ModelConfig(backend="insightface")
    assert config.det_threshold == 0.5 and "non-commercial" in config.pack_license
    assert ModelConfig(backend="insightface", det_threshold=0.3).det_threshold == 0.3
    assert ModelConfig().det_threshold == 0.0 and ModelConfig().pack_license is None
    job = validate_job(
        {
            "datasets": [{"name": "a", "source": "x"}],
            "model": {"backend": "insightface", "pack": "gs://b/p/tiny/"},
        }
    )
    assert job.model.pack_license == "unknown"
    assert validate_job(job.model_dump() | {}).model == job.model  # a dumped config loads back as it was


def test_model_ids():
    assert model_id_for(ModelConfig(backend="insightface")) == "scrfd_10g+w600k_r50"
    assert (
        model_id_for(ModelConfig(backend="insightface", pack="gs://b/packs/buffalo_l/"))
        == "scrfd_10g+w600k_r50"
    )
    assert model_id_for(ModelConfig(backend="insightface", pack="/models/tiny")) == "insightface-tiny"


def test_model_returns_faces_best_first_in_original_pixels(tmp_path, faces_dir):
    from pipelines.core.decode import decode_image

    pack = make_pack(tmp_path / "tiny")
    model = load_model(ModelConfig(backend="insightface", pack=str(pack), max_faces=5, min_face_size=10))
    assert (model.model_id, model.dim, model.match_threshold) == ("insightface-tiny", 512, 0.4)
    photos = [decode_image(p.read_bytes(), 100_000_000) for p in sorted(faces_dir.glob("img1*.jpg"))[:6]]
    tiny = DecodedImage(np.zeros((3, 2000, 3), np.uint8))  # letterboxed to one row: no face, no error
    results = model.analyze([*photos, tiny])
    assert len(results) == 7 and results[-1] == [] and sum(map(len, results)) > 5
    for image, faces in zip(photos, results, strict=False):
        assert len(faces) <= 5
        assert [f.det_score for f in faces] == sorted((f.det_score for f in faces), reverse=True)
        for face in faces:
            x1, y1, x2, y2 = face.bbox
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
            assert face.bbox.dtype == face.landmarks.dtype == face.embedding.dtype == np.float32
            assert face.landmarks.shape == (10,) and face.embedding.shape == (512,)
            assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
