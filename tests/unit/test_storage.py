import os

import pytest

from pipelines.core import storage


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b.bin"
    storage.write_atomic(str(target), b"one")
    storage.write_atomic(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["b.bin"]


def test_create_only_refuses_an_existing_object(tmp_path):
    target = tmp_path / "m.json"
    storage.write_atomic(str(target), b"first", create_only=True)
    with pytest.raises(storage.AlreadyExists):
        storage.write_atomic(str(target), b"second", create_only=True)
    assert target.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["m.json"]


def test_remove_tmp_files_cleans_crashed_writes(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / f".part-1.parquet{storage.TMP_MARK}abc").write_bytes(b"half")
    (tmp_path / "x" / "part-0.parquet").write_bytes(b"whole")
    assert storage.remove_tmp_files(str(tmp_path)) == 1
    assert os.listdir(tmp_path / "x") == ["part-0.parquet"]


def test_listdir_join_and_sha(tmp_path):
    storage.write_atomic(storage.join(str(tmp_path), "d", "f2"), b"2")
    storage.write_atomic(storage.join(str(tmp_path), "d/", "/f1"), b"1")
    assert storage.listdir(storage.join(str(tmp_path), "d")) == ["f1", "f2"]
    assert storage.listdir(str(tmp_path / "missing")) == []
    assert storage.sha256_file(str(tmp_path / "d" / "f1")) == (
        "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"
    )
