"""Whole ingest runs through the CLI: resume after SIGKILL, a committed run given again, de-duplication.

Systemic failures (every image failing, a model that will not load) are test_engines.py's, on every
engine."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest

from pipelines.core.faults import KILL_AT, KILL_ONCE
from tests.helpers import face_rows, image_rows, make_job, manifest, run_faceaudit, write_small_copies


def run_ok(*args: str) -> str:
    proc = run_faceaudit(args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory, faces_dir) -> Path:
    """40 of the shared photos, downscaled to 480 px so that runs take seconds."""
    folder = tmp_path_factory.mktemp("small")
    write_small_copies(sorted(faces_dir.glob("img*.jpg"))[:40], folder, 480)
    return folder


def run_killed(args: list[str], point: str, marker: Path, log: Path) -> int:
    """Run the CLI with kill point ``point`` armed (pipelines.core.faults): the first process to
    reach it dies by SIGKILL and writes ``marker``. Its output (stdout, then stderr) goes to ``log``;
    what the driver leaves behind is ended with it (run_faceaudit)."""
    proc = run_faceaudit(args, env={KILL_AT: point, KILL_ONCE: str(marker)})
    log.write_text(proc.stdout + proc.stderr)
    return proc.returncode


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
    proc = run_faceaudit(args)
    after = _files(run)
    return dict(code=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, before=before, after=after)


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

    from pipelines.engines.local_engine import run_job

    job = make_job(tmp_path / "out", ("a", a), ("b", b), images_per_shard=2, workers=2)
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
