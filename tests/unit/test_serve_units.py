"""The look-up service's parts without a model: tokens, buckets, the multipart parser, hash tables
in the manifest, the request store and the configuration."""

from __future__ import annotations

import copy
import json

import pyarrow as pa
import pytest

from indexing import bundle
from indexing.errors import IntegrityError, QueryError
from indexing.lookup import hash_rows, normal_url
from indexing.requests import RecordSigner, RequestStore, TokenError
from pipelines.core.errors import ConfigError
from pipelines.service import config as serve_config
from pipelines.service.bodies import HttpError, parse_multipart
from pipelines.service.limits import Capacity, ClientKeys, Limited, RateLimiter


def test_tokens_sign_verify_expire():
    signer = RecordSigner(b"k" * 32, ttl_s=100)
    token = signer.sign(123, "v1", now=1000)
    assert signer.verify(token, now=1099).face_id == 123
    with pytest.raises(TokenError, match="expired"):
        signer.verify(token, now=1101)
    with pytest.raises(TokenError, match="did not sign"):
        RecordSigner(b"x" * 32).verify(token, now=1000)
    for bad in (None, 5, "", "a.b.c", "!!.??", "x" * 600):
        with pytest.raises(TokenError):
            signer.verify(bad, now=1000)
    with pytest.raises(ConfigError):
        RecordSigner(b"short")


def test_token_bucket_refills_and_keys_rotate_daily():
    now = [0.0]
    day = [86400.0 * 10]
    keys = ClientKeys(clock=lambda: day[0])
    limiter = RateLimiter("searches", 2, 60, keys, clock=lambda: now[0])
    limiter.take("10.0.0.1")
    limiter.take("10.0.0.1")
    with pytest.raises(Limited) as caught:
        limiter.take("10.0.0.1")
    assert caught.value.status == 429 and caught.value.retry_after == 30
    limiter.take("10.0.0.2")  # another client has its own bucket
    now[0] = 30.0
    limiter.take("10.0.0.1")  # one token came back
    key_today = keys("10.0.0.1")
    assert "10.0.0.1" not in key_today and len(key_today) == 32
    assert all("10.0.0" not in k for k in limiter.buckets)
    day[0] += 86400
    assert keys("10.0.0.1") != key_today
    limiter.take("10.0.0.1")  # a new day: yesterday's buckets are gone
    assert len(limiter.buckets) == 1


def test_bucket_store_is_bounded():
    limiter = RateLimiter("x", 1, 60, ClientKeys(), max_clients=10)
    for i in range(100):
        limiter.take(f"192.0.2.{i}")
    assert len(limiter.buckets) == 10


def test_capacity_refuses_beyond_its_slots():
    cap = Capacity(1, 9)
    with cap:
        with pytest.raises(Limited) as caught:
            cap.__enter__()
        assert caught.value.status == 503 and caught.value.retry_after == 9
    with cap:
        pass


def test_multipart_in_memory():
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="consent"\r\n\r\nyes\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="photo"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n\x00\r\n--X\r\n\xff\r\n--XyZ--\r\n"
    )
    fields = parse_multipart('multipart/form-data; boundary="XyZ"', body)
    assert fields == {"consent": b"yes", "photo": b"\x00\r\n--X\r\n\xff"}
    for ctype, raw in (
        ("text/plain", body),
        ("multipart/form-data", body),
        ("multipart/form-data; boundary=XyZ", b"garbage"),
        ("multipart/form-data; boundary=XyZ", b"--XyZ\r\nno end of headers\r\n--XyZ--"),
    ):
        with pytest.raises(HttpError) as caught:
            parse_multipart(ctype, raw)
        assert caught.value.status == 400


def _manifest_with(hashes: dict) -> bytes:
    entry = {"file": "metadata/part-0.parquet", "sha256": "0" * 64, "bytes": 1}
    body = {
        "format": bundle.FORMAT,
        "version": "20240101T000000Z-00000000",
        "match_threshold": 0.5,
        "shards": [{"ntotal": 1, "metadata": entry, "hashes": hashes}],
    }
    return bundle.seal(body)


def test_manifest_hash_tables_are_bundle_files():
    good = {"file": "lookup/hashes-0.parquet", "sha256": "a" * 64, "bytes": 10, "rows": 2}
    manifest = bundle.parse_manifest(_manifest_with(good))
    assert good in list(bundle.bundle_files(manifest))
    for bad in (
        "../../etc/passwd",
        "lookup/../metadata/part-0.parquet",
        "lookup/hashes-0.npy",
        "/abs.parquet",
    ):
        with pytest.raises(IntegrityError):
            bundle.parse_manifest(_manifest_with({**good, "file": bad}))
    with pytest.raises(IntegrityError):
        bundle.parse_manifest(_manifest_with({**good, "sha256": "zz"}))
    with pytest.raises(IntegrityError):
        bundle.parse_manifest(_manifest_with({**good, "bytes": -1}))


def test_hash_rows_cover_images_and_urls():
    sha = "ab" * 32
    meta = pa.table(
        {
            "image_sha256": [sha, sha],
            "occurrences": [
                [
                    {"dataset": "a", "source_uri": "HTTP://X.org:80/p.jpg#f"},
                    {"dataset": "b", "source_uri": "/d/p.jpg"},
                ],
                [{"dataset": "a", "source_uri": "HTTP://X.org:80/p.jpg#f"}],
            ],
        }
    )
    rows = hash_rows(meta).to_pylist()
    assert len(rows) == 3 and rows == sorted(rows, key=lambda r: r["hash"])
    by_kind = {(r["kind"], tuple(r["datasets"])) for r in rows}
    assert ("image", ("a", "b")) in by_kind and ("url", ("a",)) in by_kind and ("url", ("b",)) in by_kind
    assert normal_url("HTTP://X.org:80/p.jpg#f") == "http://x.org/p.jpg"


def test_request_store_create_only(tmp_path):
    store = RequestStore(str(tmp_path))
    request = store.create([3, 1, 3], "v1", "  me@example.org ")
    assert request.face_ids == [1, 3] and request.contact == "me@example.org"
    assert store.get(request.request_id).status == "received"
    store.decide(request.request_id, "rejected")
    with pytest.raises(QueryError, match="already decided"):
        store.decide(request.request_id, "erased")
    with pytest.raises(QueryError):
        store.get("../../etc")
    with pytest.raises(QueryError):
        store.create([], "v1")
    stored = json.loads((tmp_path / "_requests" / request.request_id / "request.json").read_text())
    assert set(stored) == {"request_id", "created_at", "face_ids", "index_version", "contact"}
    assert [r.request_id for r in store.list()] == [request.request_id]


def test_config_every_key_documented(tmp_path):
    for name, field in serve_config.ServeConfig.model_fields.items():
        assert field.description, name
    text = serve_config.describe()
    assert all(f"{name}:" in text for name in serve_config.ServeConfig.model_fields)
    path = tmp_path / "serve.yaml"
    path.write_text("workers: 3\nsearch_per_hour: 9\n")
    loaded = serve_config.load(path, {"index": "x", "workers": None, "port": 9000})
    assert (loaded.workers, loaded.search_per_hour, loaded.port, loaded.index) == (3, 9, 9000, "x")
    path.write_text("unknown_key: 1\n")
    with pytest.raises(ConfigError, match="unknown_key"):
        serve_config.load(path, {})
    copy.deepcopy(loaded)
