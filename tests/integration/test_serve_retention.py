"""No retention: after photo searches, look-ups and an erasure request, neither the temporary folder
(TMPDIR, which the service and its decode workers inherit) nor the log, nor anything the service
wrote under the index root, holds any upload's bytes or the client's address."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest

from tests.serve_helpers import KNOWN, STRANGER, build_tiny_index, no_face_png, running, search, serve_config

ADDRESS = "198.51.100.23"


@pytest.fixture(scope="module")
def index(tmp_path_factory, faces_dir):
    return build_tiny_index(tmp_path_factory.mktemp("retention-index"), faces_dir)


def marks(data: bytes) -> list[bytes]:
    """Slices that would betray the upload if found anywhere (head, middle, tail)."""
    step = max(len(data) // 3, 1)
    return [data[i : i + 48] for i in (0, step, len(data) - 48) if len(data[i : i + 48]) == 48]


def files_under(folder: Path) -> list[Path]:
    return [Path(root) / name for root, _, names in os.walk(folder) for name in names]


def test_no_upload_bytes_or_address_in_tmp_logs_or_index(
    index, faces_dir, tmp_path, monkeypatch, caplog, capfd
):
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    caplog.set_level(logging.DEBUG)
    uploads = [
        (faces_dir / KNOWN).read_bytes(),
        (faces_dir / STRANGER).read_bytes(),
        no_face_png(),
        os.urandom(4096) + b"NOT-AN-IMAGE-" * 100,
        (faces_dir / KNOWN).read_bytes() + os.urandom(2048),  # a unique file that still decodes
    ]
    before = set(files_under(index))
    config = serve_config(index, sources_token="t0ken-for-retention", workers=2, queue=2)
    with running(config, client=(ADDRESS, 43210)) as (client, service):
        records = []
        for data in uploads:
            response = search(client, data)
            assert response.status_code in (200, 422)
            records += [m["record"] for f in response.json().get("faces", []) for m in f["matches"]]
        html = client.post("/search", data={"consent": "yes"}, files={"photo": ("p.jpg", uploads[0])})
        assert html.status_code == 200
        assert search(client, uploads[0], consent="no").status_code == 400
        assert client.get("/v1/source/range/abcde").status_code == 200
        assert client.post("/v1/erasure-requests", json={"records": records[:2]}).status_code == 201
        assert client.post("/v1/erasure-requests", json={"records": ["forged.token"]}).status_code == 400
        metrics = client.get("/metrics").text
    out, err = capfd.readouterr()
    log_text = caplog.text + out + err
    assert "ready: index version" in caplog.text  # the log was captured
    assert ADDRESS not in log_text and ADDRESS not in metrics
    for data in uploads:
        for mark in marks(data):
            assert mark.decode("latin-1") not in log_text
    written = files_under(tmp) + [p for p in files_under(index) if p not in before]
    assert any("_requests" in str(p) for p in written)  # the request, and nothing else of the visit
    for path in written:
        content = path.read_bytes()
        assert ADDRESS.encode() not in content, path
        for data in uploads:
            assert not any(mark in content for mark in marks(data)), path
    assert not [p for p in written if "_requests" not in str(p)], written
