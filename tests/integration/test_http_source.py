"""URI lists of http:// entries, read against HTTP servers that the test starts on 127.0.0.1.

No assertion here is about elapsed time: the servers record what they were sent (requests,
connections, requests in flight) and hold requests on events (a gate that opens once enough
requests are in flight at the same time, a release that the test sets), so every check is a
count or an order.
"""

from __future__ import annotations

import io
import socket
import socketserver
import threading
import time
import types
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import urllib3.util.connection
from PIL import Image

from pipelines.core import sources_http
from pipelines.core.config import DatasetSpec, HttpConfig
from pipelines.core.records import WorkUnit
from pipelines.core.sources import plan_units, read_unit

pytestmark = pytest.mark.timeout(60)

# How long a held request waits for its event before the server gives up and answers 500 (so a
# broken client fails the test instead of hanging it); after one such failure, every held request
# of the test fails at once. Never reached when the code is right.
HOLD_GUARD_S = 10


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = jpeg()


def http_config(**settings) -> HttpConfig:
    """An explicit HttpConfig for servers on 127.0.0.1.

    Where HttpConfig can refuse internal addresses (``allow_networks``), loopback is opted in, so
    that these tests test retries and limits, not the address filter.
    """
    if "allow_networks" in HttpConfig.model_fields:
        settings.setdefault("allow_networks", ["127.0.0.0/8"])
    return HttpConfig(**settings)


class Gauge:
    """Counts requests in progress and the most seen at once; others can wait for that peak."""

    def __init__(self):
        self.changed = threading.Condition()
        self.now = 0
        self.peak = 0
        self.gave_up = False

    def __enter__(self):
        with self.changed:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.changed.notify_all()

    def __exit__(self, *exc):
        with self.changed:
            self.now -= 1

    def wait_for_peak(self, n: int) -> bool:
        """True once ``n`` requests have been in progress at the same time."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.peak >= n or self.gave_up, timeout=HOLD_GUARD_S):
                self.gave_up = True
                self.changed.notify_all()
            return self.peak >= n


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        with self.server.lock:
            self.server.hits[url.path] += 1
            hits = self.server.hits[url.path]
        self.pending = None
        with self.server.gauge, self.server.shared_gauge:
            # hold=N: wait until N requests are in progress at once (over every server of the test)
            if "hold" in query and not self.server.shared_gauge.wait_for_peak(int(query["hold"][0])):
                self.reply(500, b"never that many at once")
            # after=N: wait until this server has answered N other requests
            elif "after" in query and not self.server.wait_answered(int(query["after"][0])):
                self.reply(500, b"the others never came")
            else:
                if "delay" in query:
                    time.sleep(float(query["delay"][0]))
                self.route(url.path, hits)
        # Answer only once this request has left the gauges: a client that has its answer may send
        # the next request at once, and that one must not find this one still counted.
        if self.pending is not None:
            self.send(*self.pending)

    def route(self, path: str, hits: int):
        if path.startswith("/img/"):
            self.reply(200, JPEG)
        elif path.startswith("/status/"):
            self.reply(int(path.rsplit("/", 1)[1]), b"no")
        elif path == "/flaky":  # 503 once, then the image
            self.reply(503, b"busy") if hits == 1 else self.reply(200, JPEG)
        elif path == "/down":
            self.reply(503, b"busy")
        elif path == "/limited":  # asks for an hour's wait, once
            self.reply(429, b"slow down", {"Retry-After": "3600"}) if hits == 1 else self.reply(200, JPEG)
        elif path == "/slow":  # answers only once the test is over (or after the guard)
            self.server.release.wait(HOLD_GUARD_S)
            self.reply(200, JPEG)
        elif path == "/big":
            self.reply(200, b"\xff\xd8\xff" + b"0" * 5000)
        elif path == "/big-unsized":  # no Content-Length: the body ends when the connection closes
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\xff\xd8\xff" + b"0" * 5000)
            self.server.count_answer(path)
        else:
            self.reply(404, b"not found")

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None):
        self.pending = (status, body, headers)

    def send(self, status: int, body: bytes, headers: dict[str, str] | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.count_answer(urlsplit(self.path).path)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, shared_gauge: Gauge, listen: bool = True):
        super().__init__(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server_bind()  # the port is ours from here; it refuses connections until it listens
        if listen:
            self.server_activate()
        self.lock = threading.Condition()
        self.hits: Counter[str] = Counter()  # requests received, by path
        self.answered: Counter[str] = Counter()  # responses sent, by path
        self.gauge = Gauge()
        self.shared_gauge = shared_gauge
        self.release = threading.Event()
        self.gave_up = False

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count_answer(self, path: str) -> None:
        with self.lock:
            self.answered[path] += 1
            self.lock.notify_all()

    def wait_answered(self, n: int) -> bool:
        with self.lock:
            if not self.lock.wait_for(lambda: sum(self.answered.values()) >= n or self.gave_up, HOLD_GUARD_S):
                self.gave_up = True
                self.lock.notify_all()
            return sum(self.answered.values()) >= n

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()

    def handle_error(self, request, client_address):
        pass  # a client that gave up on /slow closes its end; that is expected


class DroppingServer(socketserver.ThreadingTCPServer):
    """Reads each request, records it, then closes the connection without a response, for its
    first ``drops`` connections; answers the image after that."""

    daemon_threads = True

    def __init__(self, drops: int):
        super().__init__(("127.0.0.1", 0), DroppingHandler)
        self.drops = drops
        self.lock = threading.Lock()
        self.requests: list[bytes] = []  # the request line of every connection, in order

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class DroppingHandler(socketserver.StreamRequestHandler):
    server: DroppingServer

    def handle(self):
        request_line = self.rfile.readline().strip()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # the headers
        with self.server.lock:
            self.server.requests.append(request_line)
            n = len(self.server.requests)
        if n <= self.server.drops:
            return  # the connection closes with no response: a connection error for the client
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(JPEG)}\r\nConnection: close\r\n\r\n"
        self.wfile.write(head.encode() + JPEG)


@pytest.fixture
def servers(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(sources_http, "BACKOFF_S", 0.01)
    shared = Gauge()
    started = [Server(shared) for _ in range(2)]
    for s in started:
        s.start()
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def server(servers):
    return servers[0]


@pytest.fixture
def dropping(monkeypatch):
    """Start a DroppingServer: ``dropping(n)`` drops the first n connections."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(sources_http, "BACKOFF_S", 0.01)
    made = []

    def start(drops: int) -> DroppingServer:
        made.append(DroppingServer(drops))
        threading.Thread(target=made[-1].serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return made[-1]

    yield start
    for s in made:
        s.shutdown()
        s.server_close()


@pytest.fixture
def connect_attempts(monkeypatch):
    """Every TCP connection urllib3 tries to open, in order: (host, port) and how it ended."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(sources_http, "BACKOFF_S", 0.01)
    attempts: list[tuple[tuple[str, int], str]] = []
    on_refused: list = []  # callbacks (attempt number -> None), run when a connection is refused
    real = urllib3.util.connection.create_connection

    def recording(address, *args, **kwargs):
        try:
            sock = real(address, *args, **kwargs)
        except ConnectionRefusedError:
            attempts.append((address, "refused"))
            for callback in on_refused:
                callback(len(attempts))
            raise
        attempts.append((address, "connected"))
        return sock

    monkeypatch.setattr(urllib3.util.connection, "create_connection", recording)
    return types.SimpleNamespace(attempts=attempts, on_refused=on_refused)


def unit_of(urls: list[str]) -> WorkUnit:
    return WorkUnit("web", "list.txt", "urilist", 0, tuple(urls))


def fetch(urls: list[str], **http) -> list:
    return list(read_unit(unit_of(urls), http_config(**http)))


def test_images_404_and_local_entries_from_a_csv_list(server, tmp_path):
    (tmp_path / "local.jpg").write_bytes(JPEG)
    rows = [f"{server.base}/img/a.jpg", f"{server.base}/missing.jpg", "local.jpg", f"{server.base}/img/b.jpg"]
    listing = tmp_path / "list.csv"
    listing.write_text("id,url\n" + "".join(f"{i},{u}\n" for i, u in enumerate(rows)))

    (unit,) = plan_units(DatasetSpec(name="web", source=str(listing)), 10)
    raws = list(read_unit(unit, http_config(retries=3)))

    assert [r.source_uri for r in raws] == [rows[0], rows[1], str(tmp_path / "local.jpg"), rows[3]]
    assert [r.data == JPEG for r in raws] == [True, False, True, True]
    assert raws[1].error == "HTTP 404"
    assert server.hits["/missing.jpg"] == 1  # a 404 is not retried


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 408, 410, 451])
def test_a_4xx_other_than_429_is_never_retried(server, status):
    (raw,) = fetch([f"{server.base}/status/{status}"], retries=3)
    assert raw.data is None and raw.error == f"HTTP {status}"
    assert server.hits[f"/status/{status}"] == 1  # exactly one request, though 3 retries were allowed


def test_503_then_ok_is_retried(server):
    (raw,) = fetch([f"{server.base}/flaky"], retries=2)
    assert raw.data == JPEG and raw.error is None
    assert server.hits["/flaky"] == 2


def test_retries_are_bounded(server):
    (raw,) = fetch([f"{server.base}/down"], retries=2)
    assert raw.data is None and raw.error == "HTTP 503"
    assert server.hits["/down"] == 3


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_dropped_connections_are_retried_the_configured_number_of_times(dropping, retries):
    server = dropping(drops=10)  # every connection: the request arrives, no response comes back
    (raw,) = fetch([f"{server.base}/img/a.jpg"], retries=retries)
    assert raw.data is None and raw.error.startswith("connection failed"), raw.error
    assert server.requests == [b"GET /img/a.jpg HTTP/1.1"] * (retries + 1)


def test_dropped_connections_then_an_answer_gives_the_image(dropping):
    server = dropping(drops=3)
    (raw,) = fetch([f"{server.base}/img/a.jpg"], retries=3)
    assert raw.data == JPEG and raw.error is None
    assert len(server.requests) == 4  # three dropped, the fourth answered


@pytest.mark.parametrize("retries", [0, 2])
def test_refused_connections_are_retried_the_configured_number_of_times(connect_attempts, retries):
    with socket.socket() as s:  # bound, never listening: every connection to it is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        (raw,) = fetch([f"http://127.0.0.1:{port}/a.jpg"], retries=retries, timeout_s=5)
    assert raw.data is None and raw.error.startswith("connection failed"), raw.error
    assert connect_attempts.attempts == [(("127.0.0.1", port), "refused")] * (retries + 1)


def test_a_port_that_refuses_then_accepts_gives_the_image(connect_attempts):
    server = Server(Gauge(), listen=False)  # bound: refuses connections until it listens
    started = []

    def listen_after_the_second_refusal(attempt: int) -> None:
        if attempt == 2:
            server.server_activate()
            started.append(server.start())

    connect_attempts.on_refused.append(listen_after_the_second_refusal)
    try:
        (raw,) = fetch([f"{server.base}/img/a.jpg"], retries=2, timeout_s=5)
    finally:
        if started:
            server.stop()
        else:
            server.server_close()
    assert [outcome for _, outcome in connect_attempts.attempts] == ["refused", "refused", "connected"]
    assert raw.data == JPEG and raw.error is None
    assert server.hits["/img/a.jpg"] == 1


def test_retry_after_is_capped(server, monkeypatch):
    """A Retry-After of an hour becomes a wait of RETRY_AFTER_MAX_S. Every sleep outside the
    server's handler threads is recorded (and shortened, so that a broken cap fails at once instead
    of sleeping an hour)."""
    monkeypatch.setattr(sources_http, "RETRY_AFTER_MAX_S", 0.05)
    waits: list[float] = []
    real_sleep = time.sleep

    def recording_sleep(seconds: float) -> None:
        if "process_request_thread" not in threading.current_thread().name:
            waits.append(seconds)
        real_sleep(min(seconds, 0.05))

    monkeypatch.setattr(time, "sleep", recording_sleep)
    (raw,) = fetch([f"{server.base}/limited"], retries=1)
    monkeypatch.setattr(time, "sleep", real_sleep)
    assert raw.data == JPEG
    assert server.hits["/limited"] == 2  # the 429 was retried...
    assert waits == [0.05]  # ...after the capped wait, and only that


def test_slow_endpoint_times_out_while_the_server_is_still_answering(server):
    (raw,) = fetch([f"{server.base}/slow"], timeout_s=0.3, retries=1)
    assert raw.data is None and raw.error == "timed out"
    assert server.hits["/slow"] == 2  # one retry
    assert server.answered["/slow"] == 0  # the client gave up on both before any answer was sent


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
def test_oversize_body_is_refused(server, path):
    (raw,) = fetch([f"{server.base}{path}"], max_bytes=1000)
    assert raw.data is None and raw.error == "larger than max_bytes (1000)"


def test_items_are_yielded_in_unit_order(server):
    # The first item is answered only after the server has answered the five others.
    urls = [f"{server.base}/img/{i}.jpg" + ("?after=5" if i == 0 else "") for i in range(6)]
    raws = fetch(urls, per_host=4)
    assert [r.source_uri for r in raws] == urls
    assert all(r.data == JPEG for r in raws)


def test_per_host_limit_is_honoured_across_hosts(servers):
    a, b = servers
    # Each request is held until 4 requests (2 per host x 2 hosts) have been in flight at once:
    # the limit is reached on both hosts at the same time, or the requests fail. (The short delay
    # after that only gives a client that passes the limit the chance to show it.)
    urls = [f"{s.base}/img/{i}.jpg?hold=4&delay=0.05" for i in range(10) for s in (a, b)]
    raws = fetch(urls, per_host=2)
    assert all(r.data == JPEG for r in raws), [r.error for r in raws]
    assert a.shared_gauge.peak == 4  # two hosts are fetched at the same time
    assert a.gauge.peak == 2 and b.gauge.peak == 2  # the limit is reached, never passed


def test_per_host_limit_holds_for_units_read_in_parallel(server):
    # Held until 3 requests are in flight at once: the limit is reached, or the requests fail.
    units = [
        unit_of([f"{server.base}/img/{u}-{i}.jpg?hold=3&delay=0.05" for i in range(6)]) for u in range(3)
    ]
    http = http_config(per_host=3)
    results: dict[int, list] = {}
    threads = [
        threading.Thread(target=lambda u=u: results.__setitem__(u, list(read_unit(units[u], http))))
        for u in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.data == JPEG for raws in results.values() for r in raws)
    assert sum(server.hits.values()) == 18
    assert server.gauge.peak == 3


def test_stopping_early_does_not_fetch_the_rest(server):
    urls = [f"{server.base}/img/{i}.jpg?delay=0.05" for i in range(200)]
    reader = read_unit(unit_of(urls), http_config(per_host=4))
    first = next(reader)
    reader.close()
    assert first.data == JPEG
    assert sum(server.hits.values()) < 60  # only the window in flight, not all 200
