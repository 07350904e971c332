"""The look-up page in real headless Chromium (Playwright, Debian's /usr/bin/chromium) against the
service on 127.0.0.1 (uvicorn in a thread) and a tiny real index: consent first, a known face, a
stranger, the camera (a fake device playing a test photo), an erasure request's receipt and the
identifier look-up; every request the page makes is recorded and must go to the service itself.
Screenshots go to $FACEAUDIT_ARTIFACTS (else the test's tmp folder); with FACEAUDIT_UPDATE_DOCS=1
one is copied to docs/img/lookup.png."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, NEEDS_BROWSER, REPO
from tests.serve_helpers import KNOWN, STRANGER, build_tiny_index, serve_config

pytestmark = NEEDS_BROWSER


def y4m_from_photo(photo: Path, out: Path, frames: int = 5) -> Path:
    """A short Y4M clip (4:2:0) of ``photo`` for Chromium's fake camera."""
    image = Image.open(photo).convert("RGB")
    width = 640
    height = int(round(image.height * width / image.width / 2)) * 2
    ycc = np.asarray(image.resize((width, height)).convert("YCbCr"))
    y = ycc[:, :, 0]
    u = ycc[::2, ::2, 1]
    v = ycc[::2, ::2, 2]
    frame = b"FRAME\n" + y.tobytes() + u.tobytes() + v.tobytes()
    out.write_bytes(f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode() + frame * frames)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, faces_dir):
    import uvicorn

    from pipelines.service.app import create_app

    index = build_tiny_index(tmp_path_factory.mktemp("browser-index"), faces_dir)
    port = free_port()
    app = create_app(serve_config(index, host="127.0.0.1", port=port, workers=1, queue=2))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, access_log=False, log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert app.state.service.ready.wait(120), app.state.service.failed
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = (
        Path(os.environ.get("FACEAUDIT_ARTIFACTS") or tmp_path_factory.mktemp("artifacts")) / "serve-browser"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_lookup_page_in_chromium(server, faces_dir, artifacts, tmp_path):
    from playwright.sync_api import sync_playwright

    camera = y4m_from_photo(faces_dir / KNOWN, tmp_path / "camera.y4m")
    args = [
        *CHROMIUM_ARGS,
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={camera}",
    ]
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        context = browser.new_context(viewport={"width": 420, "height": 900})  # a phone's width
        context.grant_permissions(["camera"], origin=server)
        page = context.new_page()
        page.on("request", lambda r: requested.append(r.url))
        page.goto(server + "/")
        page.wait_for_load_state("networkidle")

        # no consent: nothing is sent
        page.set_input_files("#photo", str(faces_dir / KNOWN))
        page.click("#search-button")
        page.wait_for_selector("#consent-needed", state="visible")
        page.screenshot(path=str(artifacts / "1-no-consent.png"), full_page=True)
        assert not [u for u in requested if "/search" in u]

        # a known face: its data sets, in plain words
        page.check("#consent")
        page.click("#search-button")
        page.wait_for_selector("#results >> text=your face appears in", timeout=60_000)
        results = page.inner_text("#results")
        assert "alpha" in results and "beta" in results and "3 image(s)" in results
        page.screenshot(path=str(artifacts / "2-known-face.png"), full_page=True)

        # the erasure request and its receipt
        page.fill("#contact", "me@example.org")
        page.click("#erasure-button")
        page.wait_for_selector("#receipt >> text=received", timeout=30_000)
        assert "Request" in page.inner_text("#receipt")
        page.screenshot(path=str(artifacts / "3-erasure-receipt.png"), full_page=True)

        # a stranger: no match, with the data sets searched
        page.set_input_files("#photo", str(faces_dir / STRANGER))
        page.click("#search-button")
        page.wait_for_selector("#results >> text=no match in these 2 data sets", timeout=60_000)
        assert "alpha, beta" in page.inner_text("#results")
        page.screenshot(path=str(artifacts / "4-stranger.png"), full_page=True)

        # the camera: a still of the fake device's picture
        page.click("#camera-start")
        page.wait_for_selector("#camera-take", state="visible", timeout=30_000)
        page.wait_for_function("document.getElementById('camera-video').videoWidth > 0")
        page.click("#camera-take")
        page.wait_for_selector("#results >> text=your face appears in", timeout=60_000)
        page.screenshot(path=str(artifacts / "5-camera.png"), full_page=True)

        # identifier look-up: the file is hashed in the page, 5 hex characters are sent
        before = len(requested)
        page.set_input_files("#ident-file", str(faces_dir / "img41.jpg"))
        page.click("#ident-form button")
        page.wait_for_selector("#ident-result >> text=appears in beta", timeout=30_000)
        lookups = [u for u in requested[before:] if "/v1/source/range/" in u]
        assert len(lookups) == 1 and len(lookups[0].rsplit("/", 1)[1]) == 5
        page.screenshot(path=str(artifacts / "6-identifier.png"), full_page=True)

        browser.close()
    assert requested and all(u.startswith(server + "/") for u in requested), sorted(set(requested))
    if os.environ.get("FACEAUDIT_UPDATE_DOCS") == "1":
        shutil.copy(artifacts / "2-known-face.png", REPO / "docs" / "img" / "lookup.png")
