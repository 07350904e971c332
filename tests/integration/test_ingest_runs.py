"""Whole ingest runs through the CLI: resume after SIGKILL, a committed run given again, de-duplication.

Systemic failures (every image failing, a model that will not load) are test_engines.py's, on every
engine."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.core.faults import KILL_AT, KILL_ONCE
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


def run_killed(args: list[str], point: str, marker: Path, log: Path) -> int:
    """Run the CLI with kill point ``point`` armed (pipelines.core.faults): the first process to
    reach it dies by SIGKILL and writes ``marker``. Output goes to ``log``, not a pipe (a killed
    driver's workers may hold a pipe open); what the driver leaves behind is ended with it."""
    environ = {k: v for k, v in os.environ.items() if k not in (KILL_AT, KILL_ONCE)}
    environ.update({KILL_AT: point, KILL_ONCE: str(marker)})
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines", *args],
            cwd=REPO,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def test_resume_after_sigkill_gives_the_rows_of_an_uninterrupted_run(tmp_path, small_photos):
    common = ["ingest", "--dataset", f"small={small_photos}", "--images-per-shard", "3", "--no-progress"]
    run_ok(*common, "--out", str(tmp_path / "clean"), "--run-id", "r1")

    # 40 images, 14 units. The driver dies after the 4th unit's faces shard, before its images
    # shard (the unit's done-marker): 3 units done and a 4th half-written.
    out, marker = tmp_path / "killed", tmp_path / "killed-once"
    args = [*common, "--out", str(out), "--run-id", "r1"]
    code = run_killed(args, "unit.after_faces_shard:4", marker, tmp_path / "killed.log")
    assert code == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert marker.read_text().split()[1] == "unit.after_faces_shard:4"
    run = out / "runs" / "r1"
    assert not (run / "_manifest.json").exists()
    assert len(list((run / "images").glob("part-*.parquet"))) == 3
    assert len(list((run / "faces").glob("part-*.parquet"))) == 4

    run_ok(*args)
    clean = tmp_path / "clean" / "runs" / "r1"
    assert image_rows(run) == image_rows(clean)
    assert face_rows(run) == face_rows(clean)
    assert manifest(run)["counts"] == manifest(clean)["counts"]
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]


def _files(run: Path) -> dict[str, tuple[int, str]]:
    """Every file of a run folder: (mtime in ns, sha256)."""
    return {
        str(p.relative_to(run)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def given_twice(tmp_path_factory, small_photos) -> dict:
    """A run committed, then given again (same run id, same out): each file before and after the
    second time, and what the second time printed."""
    root = tmp_path_factory.mktemp("given-twice")
    photos = root / "photos"
    photos.mkdir()
    for name in sorted(p.name for p in small_photos.iterdir())[:4]:
        (photos / name).write_bytes((small_photos / name).read_bytes())
    args = ["ingest", "--dataset", f"p={photos}", "--images-per-shard", "2", "--no-progress"]
    args += ["--out", str(root / "out"), "--run-id", "r"]
    run_ok(*args)
    run = root / "out" / "runs" / "r"
    before = _files(run)
    proc = faceaudit(*args)
    stdout, stderr = proc.communicate(timeout=300)
    return dict(code=proc.returncode, stdout=stdout, stderr=stderr, before=before, after=_files(run))


def test_a_committed_run_given_again_does_nothing_and_says_so(given_twice):
    run = given_twice
    assert run["code"] == 0, run["stderr"]
    assert "this run was already complete; nothing was done" in run["stderr"], run["stderr"]
    assert run["stdout"].split() == ["r"]  # the run id, as after any run
    before, after = run["before"], run["after"]
    assert "_manifest.json" in before and len([f for f in before if f.startswith("images/")]) == 2
    written = {f: before[f] for f in before if f.endswith(".parquet") or f == "_manifest.json"}
    assert {f: after.get(f) for f in written} == written  # no shard or manifest rewritten
    assert sorted(after) == sorted(before)  # nothing added or removed


def test_a_committed_run_given_again_keeps_its_report(given_twice):
    """The report of a complete run is not rewritten (its 'analyzed' count would go to 0)."""
    before, after = given_twice["before"], given_twice["after"]
    assert {f: after[f] for f in before if f.startswith("report.")} == {
        f: before[f] for f in before if f.startswith("report.")
    }


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
