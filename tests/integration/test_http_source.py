"""URI lists of http:// entries, read against HTTP servers that the test starts on 127.0.0.1."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from pipelines.core import sources_http
from pipelines.core.config import DatasetSpec, HttpConfig
from pipelines.core.records import WorkUnit
from pipelines.core.sources import plan_units, read_unit

pytestmark = pytest.mark.timeout(60)


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = jpeg()


class Gauge:
    """Counts requests in progress and the most seen at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self):
        url = urlsplit(self.path)
        with self.server.lock:
            self.server.hits[url.path] += 1
            hits = self.server.hits[url.path]
        with self.server.gauge, self.server.shared_gauge:
            delay = float(parse_qs(url.query).get("delay", ["0"])[0])
            time.sleep(delay)
            self.route(url.path, hits)

    def route(self, path: str, hits: int):
        if path.startswith("/img/"):
            self.reply(200, JPEG)
        elif path == "/flaky":  # 503 once, then the image
            self.reply(503, b"busy") if hits == 1 else self.reply(200, JPEG)
        elif path == "/down":
            self.reply(503, b"busy")
        elif path == "/limited":  # asks for an hour's wait, once
            self.reply(429, b"slow down", {"Retry-After": "3600"}) if hits == 1 else self.reply(200, JPEG)
        elif path == "/slow":
            time.sleep(3)
            self.reply(200, JPEG)
        elif path == "/big":
            self.reply(200, b"\xff\xd8\xff" + b"0" * 5000)
        elif path == "/big-unsized":  # no Content-Length: the body ends when the connection closes
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\xff\xd8\xff" + b"0" * 5000)
        else:
            self.reply(404, b"not found")

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, shared_gauge: Gauge):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.gauge = Gauge()
        self.shared_gauge = shared_gauge

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        pass  # a client that gave up on /slow closes its end; that is expected


@pytest.fixture
def servers(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(sources_http, "BACKOFF_S", 0.01)
    shared = Gauge()
    started = [Server(shared) for _ in range(2)]
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True) for s in started
    ]
    for t in threads:
        t.start()
    yield started
    for s in started:
        s.shutdown()
        s.server_close()


@pytest.fixture
def server(servers):
    return servers[0]


def unit_of(urls: list[str]) -> WorkUnit:
    return WorkUnit("web", "list.txt", "urilist", 0, tuple(urls))


def fetch(urls: list[str], **http) -> list:
    return list(read_unit(unit_of(urls), HttpConfig(**http)))


def test_images_404_and_local_entries_from_a_csv_list(server, tmp_path):
    (tmp_path / "local.jpg").write_bytes(JPEG)
    rows = [f"{server.base}/img/a.jpg", f"{server.base}/missing.jpg", "local.jpg", f"{server.base}/img/b.jpg"]
    listing = tmp_path / "list.csv"
    listing.write_text("id,url\n" + "".join(f"{i},{u}\n" for i, u in enumerate(rows)))

    (unit,) = plan_units(DatasetSpec(name="web", source=str(listing)), 10)
    raws = list(read_unit(unit, HttpConfig(retries=3)))

    assert [r.source_uri for r in raws] == [rows[0], rows[1], str(tmp_path / "local.jpg"), rows[3]]
    assert [r.data == JPEG for r in raws] == [True, False, True, True]
    assert raws[1].error == "HTTP 404"
    assert server.hits["/missing.jpg"] == 1  # a 404 is not retried


def test_503_then_ok_is_retried(server):
    (raw,) = fetch([f"{server.base}/flaky"], retries=2)
    assert raw.data == JPEG and raw.error is None
    assert server.hits["/flaky"] == 2


def test_retries_are_bounded(server):
    (raw,) = fetch([f"{server.base}/down"], retries=2)
    assert raw.data is None and raw.error == "HTTP 503"
    assert server.hits["/down"] == 3


def test_retry_after_is_capped(server, monkeypatch):
    monkeypatch.setattr(sources_http, "RETRY_AFTER_MAX_S", 0.05)
    start = time.monotonic()
    (raw,) = fetch([f"{server.base}/limited"], retries=1)
    assert raw.data == JPEG
    assert time.monotonic() - start < 5


def test_slow_endpoint_times_out_in_bounded_time(server):
    start = time.monotonic()
    (raw,) = fetch([f"{server.base}/slow"], timeout_s=0.3, retries=1)
    elapsed = time.monotonic() - start
    assert raw.data is None and raw.error == "timed out"
    assert server.hits["/slow"] == 2  # one retry
    assert elapsed < 2.5


def test_connection_refused_is_an_error_row():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (raw,) = fetch([f"http://127.0.0.1:{port}/a.jpg"], retries=1, timeout_s=1)
    assert raw.data is None and raw.error.startswith("connection failed")


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
def test_oversize_body_is_refused(server, path):
    (raw,) = fetch([f"{server.base}{path}"], max_bytes=1000)
    assert raw.data is None and raw.error == "larger than max_bytes (1000)"


def test_items_are_yielded_in_unit_order(server):
    urls = [f"{server.base}/img/{i}.jpg?delay={0.3 if i == 0 else 0}" for i in range(6)]
    raws = fetch(urls, per_host=4)
    assert [r.source_uri for r in raws] == urls
    assert all(r.data == JPEG for r in raws)


def test_per_host_limit_is_honoured_across_hosts(servers):
    a, b = servers
    urls = [f"{s.base}/img/{i}.jpg?delay=0.15" for i in range(10) for s in (a, b)]
    start = time.monotonic()
    raws = fetch(urls, per_host=2)
    elapsed = time.monotonic() - start
    assert all(r.data == JPEG for r in raws)
    assert a.gauge.peak == 2 and b.gauge.peak == 2  # the limit is reached, never passed
    assert a.shared_gauge.peak > 2  # two hosts are fetched at the same time
    assert elapsed < 10 * 0.15 * 2  # faster than one request at a time


def test_per_host_limit_holds_for_units_read_in_parallel(server):
    units = [unit_of([f"{server.base}/img/{u}-{i}.jpg?delay=0.1" for i in range(6)]) for u in range(3)]
    http = HttpConfig(per_host=3)
    threads = [threading.Thread(target=lambda u=u: list(read_unit(u, http))) for u in units]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(server.hits.values()) == 18
    assert server.gauge.peak == 3


def test_stopping_early_does_not_fetch_the_rest(server):
    urls = [f"{server.base}/img/{i}.jpg?delay=0.05" for i in range(200)]
    reader = read_unit(unit_of(urls), HttpConfig(per_host=4))
    first = next(reader)
    reader.close()
    assert first.data == JPEG
    assert sum(server.hits.values()) < 60  # only the window in flight, not all 200
