"""The erasure log: salted hashes only, one create-only entry per erasure, read back as a set."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pyarrow as pa
import pytest

from indexing.search import drop_erased as drop_erased_hits
from pipelines.core import erasure, storage
from pipelines.core.errors import FatalError

SHA_A = hashlib.sha256(b"image a").hexdigest()
SHA_B = hashlib.sha256(b"image b").hexdigest()


def test_an_entry_holds_no_id_in_clear_and_reads_back(tmp_path):
    log = erasure.ErasureLog(str(tmp_path / "_erasure"))
    name = log.append([12345678901234, 42], [SHA_A], whole_images=[SHA_B])
    raw = (tmp_path / "_erasure" / "entries" / name).read_text()
    for clear in ("12345678901234", SHA_A, SHA_B, SHA_A[:16], SHA_B[-16:]):
        assert clear not in raw
    body = json.loads(raw)
    # short ids cannot be searched for in hex, so check that every face entry is a 128-bit hash
    assert all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{32}", h) for h in body["faces"])
    assert body["format"] == erasure.FORMAT and len(body["faces"]) == 2 and len(body["whole_images"]) == 1
    erased = log.load()
    assert erased.face_erased(42) and erased.face_erased(12345678901234) and not erased.face_erased(43)
    assert erased.face_erased(7, SHA_B) and not erased.face_erased(7, SHA_A)  # B erased whole, A not
    assert erased.mask(np.array([41, 42, 43]), [SHA_A, SHA_A, SHA_B]).tolist() == [False, True, True]


def test_the_salt_is_created_once_and_keys_the_hashes(tmp_path):
    uri = str(tmp_path / "log")
    first = erasure.ErasureLog(uri).keys(create=True)
    again = erasure.ErasureLog(uri).keys(create=True)
    assert first == again and len(first.salt) == 32
    other = erasure.ErasureLog(str(tmp_path / "other")).keys(create=True)
    assert first.face(42) != other.face(42)  # a hash says nothing without its log's salt
    assert first.face(42) != first.face(43) and first.image(SHA_A) != first.face(42)


def test_entries_are_create_only_and_appended(tmp_path):
    log = erasure.ErasureLog(str(tmp_path))
    names = [log.append([i], [SHA_A]) for i in range(3)]
    assert len(set(names)) == 3 and log.entry_names() == sorted(names)
    entry = storage.join(str(tmp_path), erasure.ENTRIES, names[0])
    with pytest.raises(storage.AlreadyExists):
        storage.write_atomic(entry, b"{}", create_only=True)
    assert log.load().entries == tuple(sorted(names)) and len(log.load().faces) == 3


def test_a_missing_log_is_empty_and_a_damaged_one_fails_loudly(tmp_path):
    assert not erasure.load(None) and not erasure.load(str(tmp_path / "absent"))
    assert not erasure.EMPTY.mask([1, 2]).any()
    log = erasure.ErasureLog(str(tmp_path / "log"))
    log.append([1], [SHA_A])
    (tmp_path / "log" / erasure.SALT).unlink()
    with pytest.raises(FatalError, match="no SALT"):
        log.load()
    log.keys(create=True)
    (tmp_path / "log" / erasure.ENTRIES / "bad.json").write_text("{not json")
    with pytest.raises(FatalError, match="not valid JSON"):
        log.load()


def test_a_run_drops_the_faces_its_log_names(tmp_path):
    log = str(tmp_path / "index" / "_erasure")
    erasure.ErasureLog(log).append([2], [SHA_A], whole_images=[SHA_B])
    run = str(tmp_path / "runs" / "r1")
    faces = pa.table(
        {"face_id": pa.array([1, 2, 3, 4], pa.int64()), "image_sha256": [SHA_A, SHA_A, SHA_B, SHA_A]}
    )
    assert erasure.drop_erased(run, faces) == faces  # no pointer: the run honours no log
    erasure.point_run(run, log)
    assert erasure.drop_erased(run, faces).column("face_id").to_pylist() == [1, 4]
    erasure.point_run(run, None)
    assert erasure.drop_erased(run, faces) == faces


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_search_results_skip_erased_hits_and_pad(tmp_path, k):
    log = erasure.ErasureLog(str(tmp_path))
    log.append([20, 40], [SHA_A])
    ids = np.array([[10, 20, 30, 40, 50], [20, 40, -1, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.8, -np.inf, -np.inf, -np.inf]], dtype=np.float32)
    s, i = drop_erased_hits(scores, ids, log.load(), k)
    assert i.shape == (2, k)
    assert i[0].tolist() == [10, 30, 50, -1, -1][:k] and i[1].tolist() == [-1] * k
    assert s[0, 0] == np.float32(0.9)
