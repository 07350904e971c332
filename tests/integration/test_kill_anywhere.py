"""Kill-anywhere: SIGKILL a job at a named point, run it again, and get exactly what an
uninterrupted run gives (docs/reliability.md).

Every job is a real subprocess (``python -m pipelines ...``) on the real photos and dlib models,
killed by ``pipelines.core.faults`` (FACEAUDIT_KILL_AT). Ray runs join one local Ray instance of
this test session; Beam runs on the DirectRunner in the driver's process. A point that hits a Ray
worker kills only that worker: the engine must retry its unit and the run must still be exact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from indexing import build_index, open_index
from pipelines.core import orphans
from pipelines.core.faults import KILL_AT, KILL_ONCE
from pipelines.engines.local_engine import run_job
from tests.helpers import face_rows, image_rows, make_job, manifest, run_faceaudit, write_small_copies

RUN_ID = "r"
PER_SHARD = 3  # 9 images: 3 units of 3, so a kill can fall between units and inside one
PHOTOS = 8

# Local and index build: every point. Units commit faces, then images (write_atomic: temporary
# file, then rename): on the local engine the 3rd write is the second unit's faces shard and the
# 7th the run manifest; in the index build the 1st is the sweep lock (pipelines.core.locks.sweep_lock),
# the 2nd the manifest and the 3rd CURRENT.
LOCAL_POINTS = [
    "analyze.batch:1",  # the driver, while a worker decodes (9 images: one batch of up to 16)
    "storage.before_rename:3",  # inside a shard write: temporary file written, not renamed
    "unit.after_faces_shard:2",  # between a unit's faces and images shards
    "run.before_manifest",  # every unit committed, no manifest
    "storage.before_rename:7",  # inside the manifest write
]
INDEX_POINTS = [
    "index.shard_written",
    "index.before_manifest",
    "storage.before_rename:2",  # inside the manifest write
    "index.before_current",
    "index.move_current",
    "storage.before_rename:3",  # inside CURRENT's write
]
# Ray: one point hits an actor inside its first shard write (the engine retries the unit and the
# driver deletes the temporary file), one the driver. An actor killed while it analyses is
# test_engines.py's test_ray_replaces_a_killed_actor_and_the_output_is_exact.
RAY_POINTS = ["storage.before_rename:1", "run.before_manifest"]
# Beam (DirectRunner, in the driver's process): during analysis and between the last shard and
# the manifest.
BEAM_POINTS = ["analyze.batch:3", "run.before_manifest"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, faces_dir) -> Path:
    """8 small photos and a copy of one of them in a later unit (its faces belong to the first)."""
    folder = tmp_path_factory.mktemp("kill-photos")
    write_small_copies(sorted(faces_dir.glob("img*.jpg"))[:PHOTOS], folder, 320)
    first = sorted(folder.iterdir())[0]
    (folder / "zz-copy.jpg").write_bytes(first.read_bytes())
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, photos) -> Path:
    """The uninterrupted run (in this process, the settings of the killed runs)."""
    out = tmp_path_factory.mktemp("kill-reference")
    job = make_job(out, ("faces", photos), run_id=RUN_ID, images_per_shard=PER_SHARD, workers=1)
    return Path(run_job(job).uri)


@pytest.fixture(scope="module")
def reference_index(tmp_path_factory, reference) -> tuple[np.ndarray, list]:
    """Queries (every face of the reference run) and the uninterrupted index's answers to them."""
    out = tmp_path_factory.mktemp("kill-reference-index")
    build_index([str(reference.parent.parent)], str(out / "index"))
    queries = np.asarray([f["embedding"] for f in face_rows(reference)], dtype=np.float32)
    return queries, search(str(out / "index"), queries)


@pytest.fixture
def ray_address(ray_local) -> str:
    """The session's Ray, for the runs to join (starting one per run costs far more)."""
    return ray_local.get_runtime_context().gcs_address


# ---------------------------------------------------------------- running and killing


@dataclass
class Outcome:
    code: int
    killed: str | None  # "driver", "worker" (another process of the job) or None: nobody
    err: str  # stderr's tail


def run_cli(args: list[str], tmp: Path, point: str | None = None, **env: str) -> Outcome:
    """The CLI to its end (run_faceaudit: output in files, not pipes, since a killed job's orphans
    may hold a pipe open; a SIGKILLed driver's own subprocesses, such as Beam's decode pool, outlive
    it blocked for good and are ended with it, as the loss of its machine would)."""
    marker = tmp / f"killed-{len(list(tmp.glob('killed-*')))}"
    if point:
        env.update({KILL_AT: point, KILL_ONCE: str(marker)})
    proc = run_faceaudit(args, env=env)
    killed = None
    if marker.exists():  # the process that died wrote its pid there first
        killed = "driver" if int(marker.read_text().split()[0]) == proc.pid else "worker"
    return Outcome(proc.returncode, killed, proc.stderr[-3000:])


def ingest(out: Path, photos: Path, engine: str, **kw) -> Outcome:
    args = [
        "ingest",
        "--dataset",
        f"faces={photos}",
        "--out",
        str(out),
        "--run-id",
        RUN_ID,
        "--engine",
        engine,
        "--images-per-shard",
        str(PER_SHARD),
        "--no-progress",
        "--workers",
        "2" if engine == "ray" else "1",
    ]
    return run_cli(args, out.parent, **kw)


def kill_then_resume(out: Path, photos: Path, engine: str, point: str, victim: str, **env: str) -> None:
    """Run with the kill point. A killed driver ends the job by SIGKILL, uncommitted, and the job
    is run again; a killed worker is the engine's to survive."""
    first = ingest(out, photos, engine, point=point, **env)
    assert first.killed == victim, f"{point}: expected the {victim} killed, got {first.killed}: {first.err}"
    if victim == "driver":
        assert first.code == -signal.SIGKILL, first.err
        assert not (out / "runs" / RUN_ID / "_manifest.json").exists()
        first = ingest(out, photos, engine, **env)
    assert first.code == 0, first.err


# ---------------------------------------------------------------- what "exact" means


def assert_exact_run(run: Path, reference: Path) -> None:
    """Every image once, every face once and identical, a consistent manifest, no leftovers."""
    rows = image_rows(run)
    assert len({r["source_uri"] for r in rows}) == len(rows) == PHOTOS + 1
    assert rows == image_rows(reference)
    faces = face_rows(run)
    assert len({f["face_id"] for f in faces}) == len(faces)
    assert_same_faces(faces, face_rows(reference))
    body = manifest(run)
    assert body["counts"] == manifest(reference)["counts"]
    listed = {s["file"]: s["sha256"] for s in body["shards"]}
    on_disk = {p.relative_to(run).as_posix() for p in run.rglob("part-*.parquet")}
    assert on_disk == set(listed), "a shard the manifest does not list, or one it lists is missing"
    for rel, sha in listed.items():
        assert hashlib.sha256((run / rel).read_bytes()).hexdigest() == sha, rel
    assert_no_leftovers(run.parent.parent)


def assert_same_faces(got: list[dict], want: list[dict]) -> None:
    """The same rows; floats exactly equal (the same model on the same bytes in the same kind of
    process), or within 1e-5 where another engine's process computes them."""
    assert [f["face_id"] for f in got] == [f["face_id"] for f in want]
    for a, b in zip(got, want, strict=True):
        for key in ("image_sha256", "dataset", "source_uri", "face_index", "model_id"):
            assert a[key] == b[key]
        for key in ("bbox", "landmarks", "embedding", "det_score"):
            np.testing.assert_allclose(a[key], b[key], atol=1e-5, rtol=0)


def assert_no_leftovers(root: Path) -> None:
    left = [
        p
        for p in root.rglob("*")
        if ".tmp-" in p.name or p.name in (orphans.BEAM_PLAN, orphans.BEAM_KNOWN, ".faceaudit-build.lock")
    ]
    assert not left, f"left behind: {left}"


def search(index: str, queries: np.ndarray) -> list:
    idx = open_index(index)  # checks every file's sha256 first
    try:
        scores, ids = idx.search_ids(queries, 5)
        return [
            [(int(i), round(float(s), 5)) for s, i in zip(row_s, row_i, strict=True)]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]
    finally:
        idx.close()


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("point", LOCAL_POINTS)
def test_local_ingest_killed_anywhere_resumes_exactly(point, tmp_path, photos, reference):
    out = tmp_path / "out"
    kill_then_resume(out, photos, "local", point, "driver")
    assert_exact_run(out / "runs" / RUN_ID, reference)


@pytest.mark.parametrize("point", RAY_POINTS)
def test_ray_ingest_killed_anywhere_resumes_exactly(point, tmp_path, photos, reference, ray_address):
    out = tmp_path / "out"
    victim = "driver" if point.startswith("run.") else "worker"
    kill_then_resume(out, photos, "ray", point, victim, RAY_ADDRESS=ray_address)
    assert_exact_run(out / "runs" / RUN_ID, reference)


@pytest.mark.parametrize("point", BEAM_POINTS)
def test_beam_ingest_killed_anywhere_resumes_exactly(point, tmp_path, photos, reference):
    out = tmp_path / "out"
    kill_then_resume(out, photos, "beam", point, "driver")
    assert_exact_run(out / "runs" / RUN_ID, reference)


@pytest.mark.parametrize("point", INDEX_POINTS)
def test_index_build_killed_anywhere_publishes_exactly(point, tmp_path, reference, reference_index):
    runs, index = str(reference.parent.parent), tmp_path / "index"
    args = ["index", "build", "--runs", runs, "--out", str(index)]
    killed = run_cli(args, tmp_path, point=point)
    assert killed.killed == "driver" and killed.code == -signal.SIGKILL, f"{point}: {killed}"
    again = run_cli(args, tmp_path)
    assert again.code == 0, again.err
    current = (index / "CURRENT").read_text().strip()
    assert json.loads((index / current / "manifest.json").read_text())["version"] == current
    queries, expected = reference_index
    assert search(str(index), queries) == expected
    # every version folder left is complete: a killed build's files went with the next build
    assert all((v / "manifest.json").exists() for v in index.iterdir() if v.is_dir() and v.name != "reports")
    assert_no_leftovers(index)


def test_kill_points_parse_and_a_bad_value_is_refused():
    from pipelines.core.faults import parse

    assert parse("unit.after_faces_shard:2") == ("unit.after_faces_shard", 2)
    assert parse("run.before_manifest") == ("run.before_manifest", 1)
    assert parse("") is None and parse(None) is None
    for bad in ("x:0", "x:two", ":3"):
        with pytest.raises(ValueError, match="FACEAUDIT_KILL_AT"):
            parse(bad)


def test_cleanup_keeps_shards_of_planned_units(tmp_path, photos, reference):
    """A resumed run drops shards of units that left the plan (here: a stray unit's shards and a
    temporary file) and keeps every done unit."""
    out = tmp_path / "out"
    shutil.copytree(reference.parent.parent, out)
    run = out / "runs" / RUN_ID
    (run / "_manifest.json").unlink()
    stray = [
        run / "faces" / "part-gone.parquet",
        run / "images" / "part-gone.parquet",
        run / "faces" / ".part-x.parquet.tmp-0",
    ]
    for path in stray:
        path.write_bytes(b"abandoned")
    again = ingest(out, photos, "local")
    assert again.code == 0, again.err
    assert not [p for p in stray if p.exists()]
    assert_exact_run(run, reference)
