"""Whole ingest runs through the CLI: resume after SIGKILL, de-duplication, systemic failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import face_rows, image_rows, manifest, write_small_copies

REPO = Path(__file__).resolve().parents[2]


def faceaudit(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a SIGKILL can reach the worker processes too
        **kwargs,
    )


def run_ok(*args: str) -> str:
    proc = faceaudit(*args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory, faces_dir) -> Path:
    """40 of the shared photos, downscaled to 480 px so that runs take seconds."""
    folder = tmp_path_factory.mktemp("small")
    write_small_copies(sorted(faces_dir.glob("img*.jpg"))[:40], folder, 480)
    return folder


def test_resume_after_sigkill_gives_the_rows_of_an_uninterrupted_run(tmp_path, small_photos):
    common = ["ingest", "--dataset", f"small={small_photos}", "--images-per-shard", "3", "--no-progress"]
    run_ok(*common, "--out", str(tmp_path / "clean"), "--run-id", "r1")

    out = tmp_path / "killed"
    proc = faceaudit(*common, "--out", str(out), "--run-id", "r1")
    images = out / "runs" / "r1" / "images"
    deadline = time.monotonic() + 120
    while len(list(images.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "runs" / "r1" / "_manifest.json").exists()
    committed = len(list(images.glob("part-*.parquet")))
    assert 3 <= committed < 14

    run_ok(*common, "--out", str(out), "--run-id", "r1")
    clean, resumed = tmp_path / "clean" / "runs" / "r1", out / "runs" / "r1"
    assert image_rows(resumed) == image_rows(clean)
    assert face_rows(resumed) == face_rows(clean)
    assert manifest(resumed)["counts"] == manifest(clean)["counts"]
    assert not [p for p in resumed.rglob("*") if ".tmp-" in p.name]


def test_same_bytes_twice_are_embedded_once(tmp_path, small_photos):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    names = sorted(p.name for p in small_photos.iterdir())[:4]
    for name in names:
        (a / name).write_bytes((small_photos / name).read_bytes())
        (b / f"again-{name}").write_bytes((small_photos / name).read_bytes())
    (a / "twice.jpg").write_bytes((small_photos / names[0]).read_bytes())

    from pipelines.core.config import DatasetSpec, JobConfig
    from pipelines.engines.local_engine import run_job

    job = JobConfig(
        datasets=[DatasetSpec(name="a", source=str(a)), DatasetSpec(name="b", source=str(b))],
        out=str(tmp_path / "out"),
        images_per_shard=2,
        progress=False,
        workers=2,
    )
    summary = run_job(job)
    assert summary.analyzed == 4
    images = image_rows(summary.uri)
    assert len(images) == 9
    assert len({r["image_sha256"] for r in images}) == 4
    faces = face_rows(summary.uri)
    assert len(faces) == len({f["face_id"] for f in faces})
    per_sha = {r["image_sha256"]: r["n_faces"] for r in images}
    assert len(faces) == sum(per_sha.values())
    assert {f["dataset"] for f in faces} == {"a"}  # written once, at the first occurrence


def test_every_image_failing_fails_the_job_without_a_manifest(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(5):
        (junk / f"{i}.jpg").write_bytes(os.urandom(100))
    proc = faceaudit("ingest", "--dataset", f"junk={junk}", "--out", str(tmp_path / "out"), "--run-id", "x")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "every one of 5 images failed" in err
    assert not (tmp_path / "out" / "runs" / "x" / "_manifest.json").exists()


def test_a_model_that_cannot_load_fails_the_job(tmp_path, small_photos):
    config = tmp_path / "job.yaml"
    config.write_text(
        f"datasets: [{{name: s, source: '{small_photos}'}}]\n"
        f"out: '{tmp_path / 'out'}'\nrun_id: x\n"
        f"model: {{backend: insightface, pack: '{tmp_path / 'no-such-pack'}'}}\n"
    )
    proc = faceaudit("ingest", "--config", str(config))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "cannot load the insightface model" in err
    assert not (tmp_path / "out" / "runs" / "x" / "_manifest.json").exists()
