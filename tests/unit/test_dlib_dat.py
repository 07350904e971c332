"""The reader of dlib's network files: both real files parse to their last byte; damaged ones are
refused with an error that names where."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipelines.core.models.dlib_backend import weight_file
from pipelines.core.models.dlib_dat import DatError, read_network

RESNET = "dlib_face_recognition_resnet_model_v1.dat"
MMOD = "mmod_human_face_detector.dat"


@pytest.fixture(scope="module")
def resnet_bytes() -> bytes:
    with open(weight_file(RESNET), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def mmod_bytes() -> bytes:
    with open(weight_file(MMOD), "rb") as f:
        return f.read()


def test_the_face_resnet_parses(resnet_bytes):
    net = read_network(resnet_bytes)
    assert net.loss.kind == "loss_metric"
    assert net.input.kind == "input_rgb_image_sized"
    assert (net.input.fields["rows"], net.input.fields["cols"]) == (150, 150)
    kinds = Counter(layer.kind for layer in net.layers)
    # dlib's dnn_face_recognition_ex.cpp: 29 convolutions, each followed by an affine layer
    assert kinds == {
        "con": 29,
        "affine": 29,
        "relu": 29,
        "tag_or_skip": 22,
        "add_prev": 14,
        "avg_pool": 5,
        "max_pool": 1,
        "fc": 1,
    }
    first, last = net.layers[0], net.layers[-1]
    assert first.weights["filters"].shape == (32, 3, 7, 7)
    assert last.kind == "fc" and last.weights["weights"].shape == (256, 128) and "bias" not in last.weights
    assert all(
        w.dtype == np.float32 and np.isfinite(w).all() for layer in net.layers for w in layer.weights.values()
    )
    assert net.size == len(resnet_bytes)


def test_the_mmod_detector_parses(mmod_bytes):
    net = read_network(mmod_bytes)
    assert net.loss.kind == "loss_mmod"
    assert net.loss.fields["windows"] == ((80, 80),)
    assert 0.3 < net.loss.fields["nms_iou_thresh"] < 0.4
    assert net.input.kind == "input_rgb_image_pyramid"
    assert [layer.kind for layer in net.layers] == ["con", "bn_con", "relu"] * 6 + ["con"]
    assert net.layers[-1].weights["filters"].shape == (1, 45, 9, 9)
    assert net.layers[1].fields["eps"] == pytest.approx(1e-4)


def test_a_path_and_its_bytes_read_the_same(mmod_bytes):
    by_path = read_network(weight_file(MMOD))
    by_bytes = read_network(mmod_bytes)
    assert [layer.offset for layer in by_path.layers] == [layer.offset for layer in by_bytes.layers]
    np.testing.assert_array_equal(by_path.layers[0].weights["filters"], by_bytes.layers[0].weights["filters"])


@pytest.mark.parametrize("cut", [0, 1, 5, 40, 100, 300, 400, 5000, 5700, 300_000, 715_300, -40, -3, -1])
def test_a_truncated_file_is_refused(mmod_bytes, cut):
    with pytest.raises(DatError, match=r"at byte \d+"):
        read_network(mmod_bytes[:cut])


def test_a_truncated_resnet_is_refused(resnet_bytes):
    with pytest.raises(DatError, match=r"truncated.*at byte \d+ \(reading layer \d+ above the input\)"):
        read_network(resnet_bytes[: len(resnet_bytes) // 2])


def test_trailing_bytes_are_refused(mmod_bytes):
    with pytest.raises(DatError, match="1 unexpected trailing bytes"):
        read_network(mmod_bytes + b"\x00")


def test_an_unknown_layer_type_is_refused_by_name(mmod_bytes):
    damaged = mmod_bytes.replace(b"\x05con_4", b"\x05con_9", 1)
    with pytest.raises(DatError, match=r"unknown layer type 'con_9' at byte 135 \(reading layer 0"):
        read_network(damaged)


def test_an_unknown_loss_is_refused(mmod_bytes):
    with pytest.raises(DatError, match=r"unknown loss layer 'loss_mmox_' at byte 2 "):
        read_network(mmod_bytes.replace(b"loss_mmod_", b"loss_mmox_", 1))


def test_an_absurd_tensor_size_is_refused_before_allocating(mmod_bytes):
    # the first convolution's params tensor: version 2, then n = 16*3*5*5 + 16 = 1216 (0x04c0)
    n_at = mmod_bytes.index(b"\x01\x02\x02\xc0\x04", 135) + 2
    huge = b"\x08" + (1 << 62).to_bytes(8, "little")
    damaged = mmod_bytes[:n_at] + huge + mmod_bytes[n_at + 3 :]
    with pytest.raises(DatError, match="out of bounds"):
        read_network(damaged)


def test_params_that_do_not_fit_the_layer_are_refused(mmod_bytes):
    # the first convolution claims 17 filters where its params hold 16 filters + 16 biases
    at = mmod_bytes.index(b"\x01\x10", 135 + 7 + 10 + 1216 * 4)
    damaged = mmod_bytes[:at] + b"\x01\x11" + mmod_bytes[at + 2 :]
    with pytest.raises(DatError, match="do not fit 17 filters"):
        read_network(damaged)


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x01\x01\x09", b"\xff" * 64, b"PK\x03\x04" + bytes(100)])
def test_garbage_is_refused(data):
    with pytest.raises(DatError):
        read_network(data)
