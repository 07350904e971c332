"""storage.py on gs:// against fake-gcs-server: commit points, compare-and-swap, faults through a proxy."""

from __future__ import annotations

import hashlib
import threading

import pytest

from pipelines.core import gcs, storage
from tests.gcs_emulator import Fault, precondition_failures

BUCKET = "unit"


@pytest.fixture(scope="module")
def bucket(gcs_emulator) -> str:
    return gcs_emulator.make_bucket(BUCKET)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(gcs, "BACKOFF_S", 0.01)


@pytest.fixture
def root(bucket, request) -> str:
    """A fresh prefix per test."""
    return storage.join(bucket, request.node.name.replace("[", "-").replace("]", ""))


def test_the_emulator_enforces_generation_preconditions(gcs_emulator):
    assert precondition_failures(gcs_emulator) == []


def test_create_only_commits_once_and_reads_back(root):
    uri = storage.join(root, "a/_manifest.json")
    storage.write_atomic(uri, b"one", create_only=True)
    with pytest.raises(storage.AlreadyExists):
        storage.write_atomic(uri, b"two", create_only=True)
    assert storage.read_bytes(uri) == b"one"
    assert storage.exists(uri) and storage.size(uri) == 3
    assert storage.sha256_file(uri) == hashlib.sha256(b"one").hexdigest()
    assert storage.listdir(storage.join(root, "a")) == ["_manifest.json"]
    assert list(storage.walk_files(root)) == [uri]


def test_replace_keeps_identical_bytes_and_replaces_the_version_read(root):
    uri = storage.join(root, "faces/part-0.parquet")
    storage.write_atomic(uri, b"shard")
    first = gcs.stat(uri)
    storage.write_atomic(uri, b"shard")  # a resumed unit writing the same bytes: nothing changes
    assert gcs.stat(uri) == first
    storage.write_atomic(uri, b"other")
    assert storage.read_bytes(uri) == b"other" and gcs.stat(uri).generation != first.generation


def test_remove_and_tmp_cleanup(root):
    keep, stale = storage.join(root, "x/part-1.parquet"), storage.join(root, f"x/.part-2{storage.TMP_MARK}ab")
    storage.write_atomic(keep, b"k")
    storage.write_atomic(stale, b"s")
    assert storage.remove_tmp_files(root) == 1
    assert list(storage.walk_files(root)) == [keep]
    storage.remove(storage.join(root, "x"))
    assert not storage.exists(keep)


@pytest.fixture(params=["local", "gcs"])
def cas_uri(request, tmp_path, root) -> str:
    return str(tmp_path / "index" / "CURRENT") if request.param == "local" else storage.join(root, "CURRENT")


def test_compare_and_swap(cas_uri):
    data, token = storage.read_versioned(cas_uri)
    assert data is None
    token = storage.write_if_unchanged(cas_uri, b"v1\n", token)
    stale = token
    token = storage.write_if_unchanged(cas_uri, b"v2\n", token)
    with pytest.raises(storage.Conflict):
        storage.write_if_unchanged(cas_uri, b"v3\n", stale)
    assert storage.read_versioned(cas_uri) == (b"v2\n", token)


def test_concurrent_compare_and_swap_loses_no_update(cas_uri):
    threads, each = 4, 5

    def bump() -> None:
        for _ in range(each):
            while True:
                data, token = storage.read_versioned(cas_uri)
                try:
                    storage.write_if_unchanged(cas_uri, str(int(data or b"0") + 1).encode(), token)
                    break
                except storage.Conflict:
                    continue

    workers = [threading.Thread(target=bump) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert storage.read_bytes(cas_uri) == str(threads * each).encode()


# ---------------------------------------------------------------- faults


def test_503s_are_retried(root, fault_proxy):
    fault_proxy.plan(Fault("503", "POST", "/upload/*", times=3), Fault("503", "GET", "*alt=media*", times=2))
    uri = storage.join(root, "m.json")
    storage.write_atomic(uri, b"{}", create_only=True)
    assert storage.read_bytes(uri) == b"{}"
    assert [k for k, _, _ in fault_proxy.injected] == ["503"] * 5


def test_a_lost_reply_then_412_is_success_when_the_bytes_are_ours(root, fault_proxy):
    fault_proxy.plan(Fault("drop", "POST", "/upload/*"))
    uri = storage.join(root, "m.json")
    storage.write_atomic(uri, b"ours", create_only=True)  # the retry meets 412: our own write
    assert fault_proxy.injected and storage.read_bytes(uri) == b"ours"


def test_a_lost_reply_then_412_is_a_conflict_when_the_bytes_are_not_ours(root, fault_proxy):
    uri = storage.join(root, "m.json")
    storage.write_atomic(uri, b"theirs", create_only=True)
    fault_proxy.plan(Fault("drop", "POST", "/upload/*"))
    with pytest.raises(storage.AlreadyExists):
        storage.write_atomic(uri, b"ours", create_only=True)
    assert storage.read_bytes(uri) == b"theirs"


def test_compare_and_swap_survives_a_lost_reply(root, fault_proxy):
    uri = storage.join(root, "CURRENT")
    _, token = storage.read_versioned(uri)
    token = storage.write_if_unchanged(uri, b"v1\n", token)
    fault_proxy.plan(Fault("drop", "POST", "/upload/*"))
    new = storage.write_if_unchanged(uri, b"v2\n", token)
    assert storage.read_versioned(uri) == (b"v2\n", new)


def test_persistent_503_fails_clearly_and_leaves_nothing(root, fault_proxy):
    fault_proxy.plan(Fault("503", "POST", "/upload/*", times=gcs.ATTEMPTS))
    uri = storage.join(root, "m.json")
    with pytest.raises(gcs.GcsError, match="still failing after"):
        storage.write_atomic(uri, b"{}", create_only=True)
    assert not storage.exists(uri)


def test_a_flipped_byte_in_a_download_is_caught_and_read_again(root, fault_proxy):
    uri = storage.join(root, "img.jpg")
    data = bytes(range(256)) * 64
    storage.write_atomic(uri, data)
    fault_proxy.plan(Fault("flip", "GET", "*alt=media*", times=3))
    assert storage.read_bytes(uri) == data  # gcsfs's cat_file
    assert gcs.get(uri)[0] == data  # the versioned read
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as f:  # a small object opened: one verified GET
        assert f.read() == data
    assert len(fault_proxy.injected) == 3


def test_a_byte_flipped_on_every_try_is_an_error(root, fault_proxy):
    uri = storage.join(root, "img.jpg")
    storage.write_atomic(uri, b"x" * 1000)
    fault_proxy.plan(Fault("flip", "GET", "*alt=media*", times=gcs.ATTEMPTS))
    with pytest.raises(gcs.ChecksumMismatch):
        storage.read_bytes(uri)


def test_a_streamed_large_object_is_checked_at_its_end(root, fault_proxy, monkeypatch):
    monkeypatch.setattr(gcs, "WHOLE_READ", 1024)  # stream anything larger than 1 KiB
    uri = storage.join(root, "shard.tar")
    data = hashlib.sha256(b"seed").digest() * 4096
    storage.write_atomic(uri, data)
    assert storage.sha256_file(uri, chunk=10_000) == hashlib.sha256(data).hexdigest()
    fault_proxy.plan(Fault("flip", "GET", "*alt=media*"))
    with pytest.raises(gcs.ChecksumMismatch):
        storage.sha256_file(uri, chunk=10_000)


def test_download_streams_to_a_local_file(root, tmp_path, monkeypatch):
    monkeypatch.setattr(gcs, "WHOLE_READ", 1024)  # the streamed, checked path
    uri = storage.join(root, "pack/w600k_r50.onnx")
    data = hashlib.sha256(b"weights").digest() * 1000
    storage.write_atomic(uri, data)
    storage.download(uri, str(tmp_path / "copy.onnx"), chunk=4096)
    assert (tmp_path / "copy.onnx").read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["copy.onnx"]


def test_a_model_pack_is_fetched_from_gcs(root, tmp_path):
    from pipelines.core.models.insightface_pack import fetch_pack

    pack = storage.join(root, "packs/buffalo")
    storage.write_atomic(storage.join(pack, "det.onnx"), b"det")
    storage.write_atomic(storage.join(pack, "SHA256SUMS"), b"x  det.onnx\n")
    folder = fetch_pack(pack, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS", "det.onnx"]
    assert (folder / "det.onnx").read_bytes() == b"det"


def test_an_upload_stored_with_other_bytes_is_deleted_and_reported(root, fault_proxy):
    # Real GCS refuses a body that does not match the crc32c sent with it; fake-gcs-server stores
    # it, which lets this test reach the client's own check of what the server says it stored.
    uri = storage.join(root, "faces/part-0.parquet")
    fault_proxy.plan(Fault("flip-upload", "POST", "*faces/part-0*"))
    with pytest.raises(gcs.ChecksumMismatch):
        storage.write_atomic(uri, b"0123456789" * 100)
    assert not storage.exists(uri)
