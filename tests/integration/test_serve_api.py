"""The look-up service's API (``faceaudit serve``): every endpoint and every refusal, on a tiny real
index (tests/serve_helpers.py), in-process through Starlette's TestClient."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time

import pytest
from typer.testing import CliRunner

from indexing.lookup import normal_url, url_hash
from tests.serve_helpers import KNOWN, STRANGER, build_tiny_index, no_face_png, running, search, serve_config

BEARER = "operator-token-for-tests"


@pytest.fixture(scope="module")
def index(tmp_path_factory, faces_dir):
    return build_tiny_index(tmp_path_factory.mktemp("serve-index"), faces_dir)


@pytest.fixture(scope="module")
def served(index):
    with running(serve_config(index, sources_token=BEARER, registry=["configs/datasets/catalog"])) as both:
        yield both


@pytest.fixture(scope="module")
def client(served):
    return served[0]


@pytest.fixture(scope="module")
def service(served):
    return served[1]


def photo(faces_dir, name):
    return (faces_dir / name).read_bytes()


def no_vectors(value) -> bool:
    """No list of more than 4 numbers anywhere in a response (a box has 4): no embedding, no pixels."""
    if isinstance(value, dict):
        return "embedding" not in value and "thumbnail" not in value and all(map(no_vectors, value.values()))
    if isinstance(value, list):
        return sum(isinstance(v, (int, float)) for v in value) <= 4 and all(map(no_vectors, value))
    return True


def test_health_ready_metrics_coverage(client, service):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["index_version"] == service.loaded.version
    cov = client.get("/coverage").json()
    assert cov["index_version"] == service.loaded.version
    assert {d["name"]: (d["images"], d["faces"]) for d in cov["datasets"]} == {
        "alpha": (3, 3),
        "beta": (2, 2),
    }
    # the known data sets this index does not hold are listed too, each with its status
    missing = {d["name"]: d["status"] for d in cov["not_covered"]}
    assert missing["ms-celeb-1m"] == "withdrawn" and len(missing) >= 20
    assert not {"alpha", "beta"} & set(missing)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "faceaudit_requests_total" in metrics.text
    assert "203.0.113.7" not in metrics.text


def test_not_ready_until_loaded(tmp_path):
    from starlette.testclient import TestClient

    from pipelines.service.app import create_app

    app = create_app(serve_config(tmp_path / "no-index"))
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while app.state.service.failed is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        assert client.get("/coverage").status_code == 503
        assert client.get("/v1/source/range/abcde").status_code == 503


def test_security_headers_everywhere(client):
    for path in ("/", "/healthz", "/v1/source/range/00000", "/static/lookup.js", "/nowhere"):
        response = client.get(path)
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert response.headers["Referrer-Policy"] == "no-referrer"


def test_known_face_strong_in_both_datasets(client, service, faces_dir):
    response = search(client, photo(faces_dir, KNOWN))
    assert response.status_code == 200
    body = response.json()
    assert body["index_version"] == service.loaded.version
    assert body["status"] == "ok" and len(body["faces"]) == 1
    face = body["faces"][0]
    strong = {d["name"]: d["images"] for d in face["datasets"] if d["band"] == "strong"}
    assert strong == {"alpha": 2, "beta": 1}
    for match in face["matches"]:
        assert set(match) == {"band", "score", "dataset", "version", "license", "bbox", "images", "record"}
        assert match["band"] in ("strong", "possible")
    assert {d["name"] for d in body["datasets_searched"]} == {"alpha", "beta"}
    assert body["bands"]["strong"] == pytest.approx(0.9223)
    assert body["bands"]["possible"] < body["bands"]["strong"]
    text = response.text
    assert "source_uri" not in text and "img38" not in text and "/data/" not in text
    assert no_vectors(body)


def test_stranger_has_no_match(client, faces_dir):
    body = search(client, photo(faces_dir, STRANGER)).json()
    assert body["status"] == "ok" and len(body["faces"]) == 1
    assert body["faces"][0]["matches"] == [] and body["faces"][0]["datasets"] == []


def test_sources_only_with_the_bearer_token(client, faces_dir):
    data = photo(faces_dir, KNOWN)
    refused = search(client, data, results="sources")
    assert refused.status_code == 403 and "index_version" in refused.json()
    wrong = client.post(
        "/v1/search",
        data={"consent": "yes", "results": "sources"},
        files={"photo": ("p.jpg", data)},
        headers={"Authorization": "Bearer nope"},
    )
    assert wrong.status_code == 403
    shown = client.post(
        "/v1/search",
        data={"consent": "yes", "results": "sources"},
        files={"photo": ("p.jpg", data)},
        headers={"Authorization": f"Bearer {BEARER}"},
    )
    assert shown.status_code == 200
    uris = {u for m in shown.json()["faces"][0]["matches"] for u in m["source_uris"]}
    assert any(u.endswith("img38.jpg") for u in uris) and any(u.endswith("img41.jpg") for u in uris)


@pytest.mark.parametrize("consent", [None, "no", "", "YES please"])
def test_missing_consent_is_400(client, faces_dir, consent):
    response = search(client, photo(faces_dir, KNOWN), consent=consent)
    assert response.status_code == 400 and "consent" in response.json()["error"]
    assert response.json()["index_version"]


def test_malformed_uploads_are_400(client):
    assert client.post("/v1/search", data={"consent": "yes"}).status_code == 400  # no photo
    assert client.post("/v1/search", content=b"x", headers={"content-type": "text/plain"}).status_code == 400
    bad = client.post(
        "/v1/search",
        content=b"--b\r\nno headers end",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert bad.status_code == 400


def test_oversize_upload_is_413(client, service):
    cap = service.config.max_upload_bytes
    response = search(client, b"\xff" * (cap + 1))
    assert response.status_code == 413
    # a body that lies about its length is cut off at the cap as well
    big = b"--b\r\n" + b"x" * (cap + 70_000)

    def chunks():
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + (1 << 16)]

    streamed = client.post(
        "/v1/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert streamed.status_code == 413


def test_non_image_is_422(client):
    response = search(client, b"this is not an image, just text" * 10)
    assert response.status_code == 422
    assert response.json()["status"] == "error" and "could not be read" in response.json()["error"]


def test_photo_without_a_face(client):
    response = search(client, no_face_png())
    assert response.status_code == 200
    assert response.json()["status"] == "no_face" and response.json()["faces"] == []


def test_range_lookup_images_and_urls(client, service, index, faces_dir):
    image = hashlib.sha256(photo(faces_dir, "img41.jpg")).hexdigest()
    body = client.get(f"/v1/source/range/{image[:5]}").json()
    assert body["index_version"] == service.loaded.version
    assert {"suffix": image[5:], "datasets": ["beta"]} in body["matches"]
    upper = client.get(f"/v1/source/range/{image[:5].upper()}").json()
    assert upper["matches"] == body["matches"]
    source = str(index.parent / "data" / "alpha" / "img38.jpg")
    url = url_hash(source)
    assert {"suffix": url[5:], "datasets": ["alpha"]} in client.get(f"/v1/source/range/{url[:5]}").json()[
        "matches"
    ]
    stranger = hashlib.sha256(photo(faces_dir, STRANGER)).hexdigest()
    found = client.get(f"/v1/source/range/{stranger[:5]}").json()["matches"]
    assert all(m["suffix"] != stranger[5:] for m in found)
    for bad in ("abcd", "abcdef", "ghijk", "%2e%2e%2f"):
        assert client.get(f"/v1/source/range/{bad}").status_code in (400, 404), bad


def test_url_normalisation():
    assert normal_url("HTTPS://Example.COM:443/a/b.jpg?x=1#frag") == "https://example.com/a/b.jpg?x=1"
    assert normal_url("http://user:pw@EXAMPLE.com:80") == "http://example.com/"
    assert normal_url("http://example.com:8080/A") == "http://example.com:8080/A"
    assert normal_url("/data/alpha/img1.jpg") == "/data/alpha/img1.jpg"


def test_erasure_request_and_status(client, service, faces_dir):
    body = search(client, photo(faces_dir, KNOWN)).json()
    records = sorted({m["record"] for m in body["faces"][0]["matches"] if m["band"] == "strong"})
    created = client.post("/v1/erasure-requests", json={"records": records, "contact": "me@example.org"})
    assert created.status_code == 201
    request = created.json()
    assert request["status"] == "received" and request["index_version"] == service.loaded.version
    status = client.get(f"/v1/erasure-requests/{request['request_id']}").json()
    assert status["status"] == "received" and status["updated_at"]
    stored = service.store.get(request["request_id"])
    assert len(stored.face_ids) == 3 and stored.contact == "me@example.org"
    folder = service.store.root + "/" + request["request_id"]
    for name in ("request.json",):
        text = open(f"{folder}/{name}").read()
        assert "embedding" not in text and "203.0.113.7" not in text
    assert client.get("/v1/erasure-requests/" + "0" * 32).status_code == 404
    assert client.get("/v1/erasure-requests/..%2f..%2fetc").status_code in (400, 404)
    assert client.get("/v1/erasure-requests/not-an-id").status_code == 400


def test_erasure_request_refuses_forged_and_expired_tokens(client, service):
    from indexing.requests import RecordSigner

    version = service.loaded.version
    forged = RecordSigner(b"another key of sixteen bytes or more").sign(42, version)
    response = client.post("/v1/erasure-requests", json={"records": [forged]})
    assert response.status_code == 400 and "did not sign" in response.json()["error"]
    expired = service.signer.sign(42, version, now=time.time() - service.signer.ttl_s - 5)
    response = client.post("/v1/erasure-requests", json={"records": [expired]})
    assert response.status_code == 400 and "expired" in response.json()["error"]
    good = service.signer.sign(42, version)
    head, mac = good.split(".")
    tampered = head[:-2] + ("A" if head[-2] != "A" else "B") + head[-1] + "." + mac
    assert client.post("/v1/erasure-requests", json={"records": [tampered]}).status_code == 400
    assert client.post("/v1/erasure-requests", json={"records": []}).status_code == 400
    assert client.post("/v1/erasure-requests", json={"records": "x"}).status_code == 400
    assert client.post("/v1/erasure-requests", content=b"{not json").status_code == 400
    assert client.post("/v1/erasure-requests", json={"records": [good], "contact": 5}).status_code == 400


def test_no_javascript_path(client, faces_dir):
    page = client.get("/")
    assert page.status_code == 200 and 'action="/search"' in page.text and "/static/lookup.js" in page.text
    assert (
        "http://" not in page.text.replace('href="http', "") and "https://" not in page.text.split("<ul")[0]
    )
    result = client.post(
        "/search", data={"consent": "yes"}, files={"photo": ("p.jpg", photo(faces_dir, KNOWN), "image/jpeg")}
    )
    assert result.status_code == 200 and "your face appears in 3 image(s)" in result.text
    assert 'name="record"' in result.text
    refused = client.post("/search", files={"photo": ("p.jpg", photo(faces_dir, KNOWN), "image/jpeg")})
    assert (
        refused.status_code == 400
        and "consent" in refused.text
        and refused.text.startswith("<!doctype html>")
    )
    stranger = client.post(
        "/search",
        data={"consent": "yes"},
        files={"photo": ("p.jpg", photo(faces_dir, STRANGER), "image/jpeg")},
    )
    assert "no match in these 2 data sets" in stranger.text
    token = result.text.split('name="record" value="')[1].split('"')[0]
    receipt = client.post("/erasure-requests", data={"record": token, "contact": ""})
    assert receipt.status_code == 201 and "was received" in receipt.text


def test_rate_limits_429_with_retry_after(index, faces_dir):
    config = serve_config(index, search_per_hour=2, range_per_minute=3, requests_per_hour=1)
    with running(config, client=("198.51.100.9", 1)) as (client, _):
        data = photo(faces_dir, STRANGER)
        assert [search(client, data).status_code for _ in range(2)] == [200, 200]
        limited = search(client, data)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        codes = [client.get("/v1/source/range/00000").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        assert int(client.get("/v1/source/range/00000").headers["Retry-After"]) >= 1
        assert client.post("/v1/erasure-requests", json={"records": ["x.y"]}).status_code == 400
        assert client.post("/v1/erasure-requests", json={"records": ["x.y"]}).status_code == 429


def test_over_capacity_503_with_retry_after(index, faces_dir):
    config = serve_config(index, workers=1, queue=0, retry_after_s=7)
    with running(config) as (client, service):
        entered, release = threading.Event(), threading.Event()
        original = service.photo.lookup

        def held(*args, **kwargs):
            entered.set()
            assert release.wait(60)
            return original(*args, **kwargs)

        service.photo.lookup = held
        first: dict = {}
        data = photo(faces_dir, KNOWN)
        worker = threading.Thread(target=lambda: first.setdefault("r", search(client, data)))
        worker.start()
        try:
            assert entered.wait(60)
            busy = search(client, data)
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "7"
            assert "busy" in busy.json()["error"]
        finally:
            release.set()
            worker.join(60)
        assert first["r"].status_code == 200
        service.photo.lookup = original
        assert search(client, data).status_code == 200  # the slot came back


def test_approve_reject_and_reload_on_current(tmp_path, faces_dir):
    """A request approved on the command line erases its faces (the service stops returning them);
    a new CURRENT is picked up without a restart."""
    from indexing.build import build_index
    from pipelines.cli import app

    root = build_tiny_index(tmp_path, faces_dir)
    config = serve_config(root, reload_on_current=True, reload_interval_s=3600)
    runner = CliRunner()
    with running(config) as (client, service):
        first_version = service.loaded.version
        body = search(client, photo(faces_dir, KNOWN)).json()
        strong = [m for m in body["faces"][0]["matches"] if m["band"] == "strong" and m["dataset"] == "beta"]
        rid = client.post("/v1/erasure-requests", json={"records": [strong[0]["record"]]}).json()[
            "request_id"
        ]
        other = client.post("/v1/erasure-requests", json={"records": [strong[0]["record"]]}).json()[
            "request_id"
        ]
        listed = runner.invoke(app, ["requests", "list", "--index", str(root), "--json"])
        assert listed.exit_code == 0, listed.output
        assert {r["request_id"] for r in json.loads(listed.output)} == {rid, other}
        done = runner.invoke(app, ["requests", "approve", rid, "--index", str(root)])
        assert done.exit_code == 0, done.output
        assert client.get(f"/v1/erasure-requests/{rid}").json()["status"] == "erased"
        rejected = runner.invoke(app, ["requests", "reject", other, "--index", str(root)])
        assert (
            rejected.exit_code == 0
            and client.get(f"/v1/erasure-requests/{other}").json()["status"] == "rejected"
        )
        again = runner.invoke(app, ["requests", "approve", rid, "--index", str(root)])
        assert again.exit_code != 0 and "already decided" in again.output
        service.loaded.index.recheck_erasures(force=True)
        after = search(client, photo(faces_dir, KNOWN)).json()
        strong_after = {d["name"] for d in after["faces"][0]["datasets"] if d["band"] == "strong"}
        assert strong_after == {"alpha"}  # beta's only face of A is erased
        image = hashlib.sha256(photo(faces_dir, "img41.jpg")).hexdigest()
        found = client.get(f"/v1/source/range/{image[:5]}").json()["matches"]
        assert all(m["suffix"] != image[5:] for m in found)  # nor is its image found by hash
        assert not service.reload_once()  # CURRENT has not moved
        runs = [r["uri"] for r in service.loaded.index.manifest["runs"]]
        new = build_index(runs, str(root))
        assert service.reload_once() and service.loaded.version == new.version != first_version
        assert client.get("/healthz").json()["index_version"] == new.version
        assert search(client, photo(faces_dir, KNOWN)).json()["index_version"] == new.version


def test_lookup_command(index, faces_dir, tmp_path):
    from pipelines.cli import app

    runner = CliRunner()
    copy = tmp_path / "img39.jpg"
    shutil.copy(faces_dir / "img39.jpg", copy)
    source = str(index.parent / "data" / "beta" / "img2.jpg")
    result = runner.invoke(
        app,
        [
            "lookup",
            "--index",
            str(index),
            "--photo",
            str(copy),
            "--url",
            source,
            "--sha256",
            "ab" * 32,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["results"]
    assert [(r["found"], r["datasets"]) for r in rows] == [(True, ["beta"]), (False, []), (True, ["alpha"])]
    assert runner.invoke(app, ["lookup", "--index", str(index)]).exit_code == 2
