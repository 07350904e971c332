"""Hostile URI lists and folders, each attack reproduced on loopback servers and local files.

Every refusal is an ``error`` row at stage ``read``; the servers record every connection they get,
so each test also proves that nothing was fetched.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from pipelines.core.config import DatasetSpec, HttpConfig
from pipelines.core.roots import OUTSIDE
from pipelines.core.sources import plan_units, read_unit

DEFAULT = HttpConfig(timeout_s=5, retries=0)


class Recorder(http.server.ThreadingHTTPServer):
    """A loopback HTTP server that records every request line; ``routes`` maps a path to
    (status, headers, body)."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", routes: dict | None = None):
        self.requests: list[str] = []
        self.routes = routes or {}
        super().__init__((host, 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        status, headers, body = self.server.routes.get(self.path, (200, {}, _jpeg()))
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def recorder(host: str = "127.0.0.1", routes: dict | None = None) -> Iterator[Recorder]:
    server = Recorder(host, routes)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def raw_listener() -> Iterator[tuple[int, list]]:
    """A TCP port on 127.0.0.1 that records each connection it accepts (for non-HTTP schemes)."""
    accepted: list = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        sock.close()


def _jpeg() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def read_all(listing: Path, entries: list[str], http: HttpConfig = DEFAULT, **spec) -> list:
    """Every occurrence the list gives, in list order."""
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("\n".join(entries) + "\n")
    units = plan_units(DatasetSpec(name="hostile", source=str(listing), **spec), 100)
    return [raw for unit in units for raw in read_unit(unit, http)]


def read_list(listing: Path, entries: list[str], http: HttpConfig = DEFAULT, **spec) -> dict[str, object]:
    return {raw.source_uri: raw for raw in read_all(listing, entries, http, **spec)}


def test_a_uri_list_stays_inside_its_data_set(tmp_path):
    outside = tmp_path / "elsewhere" / "x.jpg"
    outside.parent.mkdir()
    outside.write_bytes(_jpeg())
    data_set = tmp_path / "set"
    (data_set / "imgs").mkdir(parents=True)
    (data_set / "imgs" / "ok.jpg").write_bytes(_jpeg())
    with raw_listener() as (port, accepted):
        hostile = [
            "file:///etc/hostname",
            "/etc/passwd",
            "/etc/no-such-file-here",
            str(outside),
            "../elsewhere/x.jpg",
            "imgs/../../elsewhere/x.jpg",
            f"webhdfs://127.0.0.1:{port}/x.jpg",
            "gs://another-bucket/x.jpg",
        ]
        good, *refused = read_all(data_set / "list.txt", ["imgs/ok.jpg", *hostile])
        assert not accepted  # webhdfs:// never connected
    assert good.data == _jpeg()
    assert len(refused) == len(hostile)
    # one reason for all: an existing file, a missing one and a remote one look the same
    assert {r.error for r in refused} == {OUTSIDE} and all(r.data is None for r in refused)


def test_allowed_roots_open_a_folder_outside_the_list(tmp_path):
    outside = tmp_path / "mirror" / "x.jpg"
    outside.parent.mkdir()
    outside.write_bytes(_jpeg())
    raws = read_list(tmp_path / "set" / "list.txt", [str(outside)], allowed_roots=[str(outside.parent)])
    assert raws[str(outside)].data == _jpeg()


def test_internal_addresses_are_refused_by_default_and_nothing_is_fetched(tmp_path):
    with recorder() as server, recorder("127.0.0.2") as other:
        entries = [
            server.url("/face.jpg"),
            server.url("/face.jpg").replace("127.0.0.1", "localhost"),
            other.url("/computeMetadata/v1/"),
            "http://169.254.169.254/computeMetadata/v1/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://[::1]:9/x.jpg",
            "http://0.0.0.0:9/x.jpg",
        ]
        raws = read_list(tmp_path / "list.txt", entries)
        assert server.requests == [] and other.requests == []
    assert all(r.data is None and r.error.startswith("refused") for r in raws.values()), raws


def test_a_redirect_to_an_internal_address_is_refused_at_its_hop(tmp_path):
    with recorder("127.0.0.2") as metadata:
        target = metadata.url("/computeMetadata/v1/instance/service-accounts/default/token")
        routes = {"/face.jpg": (302, {"Location": target}, b"")}
        with recorder(routes=routes) as first:
            # the operator's mirror (127.0.0.1 only) is allowed; where it redirects to is not
            http = HttpConfig(timeout_s=5, retries=0, allow_networks=["127.0.0.1/32"])
            raws = read_list(tmp_path / "list.txt", [first.url("/face.jpg")], http)
            assert first.requests == ["/face.jpg"]
        assert metadata.requests == []
    (raw,) = raws.values()
    assert raw.data is None and raw.error.startswith("refused")


def test_redirects_are_followed_at_most_five_times(tmp_path):
    routes = {f"/r{i}": (302, {"Location": f"/r{i + 1}"}, b"") for i in range(10)}
    with recorder(routes=routes) as server:
        http = HttpConfig(timeout_s=5, retries=0, allow_networks=["127.0.0.1/32"])
        (raw,) = read_list(tmp_path / "list.txt", [server.url("/r0")], http).values()
        assert server.requests == [f"/r{i}" for i in range(6)]  # the first request and 5 redirects
    assert raw.error == "more than 5 redirects"


def test_a_server_trickling_bytes_is_cut_off_at_one_deadline(tmp_path):
    sent: list[int] = []
    finished = threading.Event()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):  # one byte every 50 ms: each read is fast, the whole is not
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    sent.append(1)
                    if finished.wait(0.05):
                        return
            except OSError:
                return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        http_cfg = HttpConfig(timeout_s=1, retries=0, allow_networks=["127.0.0.1/32"])
        url = f"http://127.0.0.1:{server.server_address[1]}/slow.jpg"
        (raw,) = read_list(tmp_path / "list.txt", [url], http_cfg).values()
        # cut off long before the body ended (a per-read timeout would have waited for all 1000)
        assert raw.error == "timed out" and len(sent) < 1000
    finally:
        finished.set()
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(60)
def test_a_fifo_in_a_folder_is_an_error_row_not_a_hang(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg())
    os.mkfifo(tmp_path / "b.jpg")
    (unit,) = plan_units(DatasetSpec(name="fifo", source=str(tmp_path)), 10)
    raws = {Path(r.source_uri).name: r for r in read_unit(unit, DEFAULT)}
    assert raws["a.jpg"].data == _jpeg()
    assert raws["b.jpg"].data is None and raws["b.jpg"].error == "not a regular file"


@pytest.mark.timeout(60)
def test_a_device_is_an_error_row_even_under_an_allowed_root(tmp_path):
    raws = read_list(tmp_path / "list.txt", ["/dev/zero"], allowed_roots=["/dev"])
    assert raws["/dev/zero"].data is None and raws["/dev/zero"].error == "not a regular file"


def test_a_symlink_out_of_the_list_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg())
    (tmp_path / "set").mkdir()
    os.symlink(secret, tmp_path / "set" / "link.jpg")
    raws = read_list(tmp_path / "set" / "list.txt", ["link.jpg"])
    (raw,) = raws.values()
    assert raw.data is None and raw.error == OUTSIDE
