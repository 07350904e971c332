import hashlib

import pytest

from pipelines.core.errors import RecordError
from pipelines.core.records import WorkUnit, face_id


def test_face_id_follows_the_design_formula():
    sha = "ab" * 32
    digest = hashlib.sha256(f"{sha}:dlib-hog+dlib-resnet-v1:3".encode()).digest()
    expected = int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
    assert face_id(sha, "dlib-hog+dlib-resnet-v1", 3) == expected


@pytest.mark.parametrize("index", range(200))
def test_face_id_is_a_non_negative_int64(index):
    value = face_id("cd" * 32, "m", index)
    assert 0 <= value < 2**63


def test_face_ids_differ_by_model_and_index():
    sha = "ef" * 32
    ids = {face_id(sha, model, i) for model in ("a", "b") for i in range(50)}
    assert len(ids) == 100


def test_unit_key_is_stable_and_sortable():
    keys = [WorkUnit("ds", "src", "folder", i, ()).key for i in (0, 2, 10, 100)]
    assert keys == sorted(keys) == ["ds-000000", "ds-000002", "ds-000010", "ds-000100"]


def test_record_error_knows_its_stages():
    assert RecordError("decode", "x" * 1000).reason == "x" * 300
    with pytest.raises(ValueError):
        RecordError("write", "no such stage")
