"""A tiny real index for the look-up service's tests: two data sets of real photos, dlib models.

``alpha`` holds img38, img39 (one person, "A") and img1 (another, "B"); ``beta`` holds img41 (A)
and img2 (B). ``KNOWN`` (img40, A) is in neither, but A is; ``STRANGER`` is nobody indexed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers import make_job

ALPHA = ("img38.jpg", "img39.jpg", "img1.jpg")
BETA = ("img41.jpg", "img2.jpg")
KNOWN = "img40.jpg"
STRANGER = "img29.jpg"


def build_tiny_index(tmp: Path, faces_dir: Path) -> Path:
    """Ingest the two data sets and build an index under ``tmp/index``; returns the index root."""
    from indexing.build import build_index
    from pipelines.engines.local_engine import run_job

    for name, photos in (("alpha", ALPHA), ("beta", BETA)):
        folder = tmp / "data" / name
        folder.mkdir(parents=True)
        for photo in photos:
            shutil.copy(faces_dir / photo, folder / photo)
    job = make_job(
        tmp / "runs",
        ("alpha", tmp / "data" / "alpha"),
        ("beta", tmp / "data" / "beta"),
        run_id="serve",
        workers=1,
    )
    run = run_job(job)
    build_index([run.uri], str(tmp / "index"))
    return tmp / "index"


def no_face_png() -> bytes:
    """A real image without a face: a grey gradient."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class running:
    """``with running(config, client=(addr, port)) as (client, service)``: the app in-process
    (TestClient, lifespan run), once the index and the model are loaded."""

    def __init__(self, config, client=("203.0.113.7", 40000)):
        from starlette.testclient import TestClient

        from pipelines.service.app import create_app

        self.app = create_app(config)
        self.service = self.app.state.service
        self.client = TestClient(self.app, client=client, raise_server_exceptions=False)

    def __enter__(self):
        self.client.__enter__()
        assert self.service.ready.wait(120), self.service.failed
        return self.client, self.service

    def __exit__(self, *exc):
        return self.client.__exit__(*exc)


def serve_config(index: Path, **settings):
    from pipelines.service.config import ServeConfig

    base = dict(
        index=str(index),
        workers=1,
        queue=0,
        search_per_hour=1000,
        range_per_minute=1000,
        requests_per_hour=1000,
        registry=[],
    )
    return ServeConfig(**{**base, **settings})


def search(client, photo: bytes, consent: str | None = "yes", **fields):
    data = {**({"consent": consent} if consent is not None else {}), **fields}
    return client.post("/v1/search", data=data, files={"photo": ("photo.jpg", photo, "image/jpeg")})
