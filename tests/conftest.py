"""Shared fixtures: the real photos in tests/data/faces, and one real ingest run of them."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from tests.helpers import REPO, make_job

# The fake-gcs-server fixtures (gcs_emulator, fault_proxy), registered once for every test module:
# one emulator per session, however many modules use it.
pytest_plugins = ["tests.gcs_emulator"]

FACES_DIR = Path(os.environ.get("FACEAUDIT_FACES", REPO / "tests" / "data" / "faces"))


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where an NVIDIA GPU is visible."""
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _has_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or bool(os.environ.get("FACEAUDIT_GPU_TESTS"))


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    if not FACES_DIR.is_dir():
        pytest.fail(f"the test photos are missing: {FACES_DIR}")
    return FACES_DIR


@pytest.fixture(scope="session")
def master_pairs(faces_dir) -> list[tuple[str, str, bool]]:
    """(file_x, file_y, same person) from master.csv."""
    with open(faces_dir / "master.csv", newline="") as f:
        return [(r["file_x"], r["file_y"], r["Decision"] == "Yes") for r in csv.DictReader(f)]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) for the session's Ray tests (starting one takes seconds); jobs run in
    subprocesses join it by its address. Stopped at the end only if started here."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def faces_run(tmp_path_factory, faces_dir):
    """One real ingest of every shared photo (dlib models, local engine), shared by all tests."""
    from pipelines.engines.local_engine import run_job

    out = tmp_path_factory.mktemp("faces-run")
    return run_job(make_job(out, ("deepface", faces_dir), run_id="faces", images_per_shard=16))
