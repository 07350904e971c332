"""One job, every engine: local, Ray (a local Ray instance) and Beam (the DirectRunner in-process)
must write the same rows, resume the same way and fail the same way."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipelines.core.config import JobConfig
from pipelines.engines import beam_engine, local_engine, ray_engine
from tests.helpers import (
    face_rows,
    image_rows,
    kill_once,
    make_job,
    manifest,
    run_faceaudit,
    write_small_copies,
)
from tests.integration.test_index_engines import OPTIONS, assert_same_bundle, engine_runner

ENGINES = ("ray", "beam")
ALL_ENGINES = ("local", *ENGINES)
BEAM_IN_PROCESS = ("--runner=DirectRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1")
# Beam's DirectRunner in worker processes, the mode where 55 of 320 images were once lost
BEAM_MULTI_PROCESS = (
    "--runner=DirectRunner",
    "--direct_running_mode=multi_processing",
    "--direct_num_workers=2",
)


def run_engine(engine: str, job: JobConfig, request, **kwargs) -> local_engine.RunSummary:
    if engine == "ray":
        request.getfixturevalue("ray_local")
        return ray_engine.run_job(job, **kwargs)
    if engine == "beam":
        return beam_engine.run_job(job, [*BEAM_IN_PROCESS, *kwargs.get("beam_args", ())])
    return local_engine.run_job(job)


def twice_job(out: Path, twice: dict[str, Path]) -> JobConfig:
    """The job of the ``twice`` data sets: units of 3 images, 2 workers, run id "r"."""
    return make_job(out, *twice.items(), run_id="r", images_per_shard=3, workers=2)


def assert_same_run(run, expected) -> None:
    """Identical images rows; the same faces rows, boxes within 1e-3 px, embeddings within 1e-5."""
    assert image_rows(run) == image_rows(expected)
    got, want = face_rows(run), face_rows(expected)
    assert [f["face_id"] for f in got] == [f["face_id"] for f in want]
    for a, b in zip(got, want, strict=True):
        for key in ("image_sha256", "dataset", "source_uri", "face_index", "model_id"):
            assert a[key] == b[key]
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-3)
        np.testing.assert_allclose(a["landmarks"], b["landmarks"], atol=1e-3)
        np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-5)
        assert abs(a["det_score"] - b["det_score"]) < 1e-5
    assert manifest(run)["counts"] == manifest(expected)["counts"]


@pytest.fixture(scope="module")
def twice(tmp_path_factory, faces_dir) -> dict[str, Path]:
    """Two small data sets that share bytes: within a unit, across units and across data sets,
    with an unreadable file and one that is not an image."""
    root = tmp_path_factory.mktemp("twice")
    a, b = root / "a", root / "b"
    a.mkdir()
    b.mkdir()
    photos = sorted(faces_dir.glob("img*.jpg"))[:8]
    write_small_copies(photos, a, 400)
    names = sorted(p.name for p in a.iterdir())
    (a / "img1x.jpg").write_bytes((a / names[0]).read_bytes())  # the same unit as its owner
    (a / "zz.jpg").write_bytes((a / names[1]).read_bytes())  # a later unit
    (a / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for name in names[-3:]:
        (b / f"again-{name}").write_bytes((a / name).read_bytes())  # another data set
    (b / "gone.jpg").symlink_to(root / "nowhere.jpg")  # unreadable: a read error row
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def twice_local(tmp_path_factory, twice) -> Path:
    out = tmp_path_factory.mktemp("twice-local")
    return Path(local_engine.run_job(twice_job(out, twice)).uri)


@pytest.fixture(scope="module")
def twice_runs(tmp_path_factory, twice, request):
    """Each engine's run of the ``twice`` job, made on first use. Ray's run has an actor killed
    mid-run (the first actor call dies), so every check of it is also a check of recovery."""
    runs: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in runs:
            out = tmp_path_factory.mktemp(f"twice-{engine}")
            job = twice_job(out, twice)
            if engine == "ray":
                with kill_once("analyze.batch", out / "killed-once"):
                    runs[engine] = Path(run_engine(engine, job, request).uri)
                assert (out / "killed-once").exists()  # an actor did die
            else:
                runs[engine] = Path(run_engine(engine, job, request).uri)
        return runs[engine]

    return get


@pytest.mark.parametrize("engine", ENGINES)
def test_duplicates_and_bad_records_give_the_local_rows(engine, twice_runs, twice_local):
    run = twice_runs(engine)
    assert manifest(run)["engine"] == engine
    assert_same_run(run, twice_local)
    faces = face_rows(run)
    assert len(faces) == len({f["face_id"] for f in faces})  # each image's faces written once


def test_ray_data_hashing_gives_the_local_rows(tmp_path, twice, twice_local, request):
    """Past ``ray.driver_hash_max`` pending images (a big run), Ray Data read tasks hash the units
    instead of the driver: the same rows."""
    job = twice_job(tmp_path / "out", twice)
    job = job.model_copy(update={"ray": job.ray.model_copy(update={"driver_hash_max": 0})})
    assert_same_run(Path(run_engine("ray", job, request).uri), twice_local)


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_skips_done_units_and_keeps_their_owners(
    engine, tmp_path, twice, twice_runs, twice_local, request
):
    """Uncommit every other unit (and the manifest) of a finished run and run it again: owners in
    done units keep their faces, duplicates in redone units take the committed results."""
    out = tmp_path / "out"
    shutil.copytree(twice_runs(engine).parent.parent, out)
    run = out / "runs" / "r"
    (run / "_manifest.json").unlink()
    parts = sorted((run / "images").glob("part-*.parquet"))
    for part in parts[1::2]:
        part.unlink()
        (run / "faces" / part.name).unlink()
    summary = run_engine(engine, twice_job(out, twice), request)
    assert summary.resumed_units == len(parts) - len(parts[1::2])
    assert_same_run(run, twice_local)


def test_ray_replaces_a_killed_actor_and_the_output_is_exact(twice_runs, twice_local):
    run = twice_runs("ray")
    assert (run.parent.parent / "killed-once").exists()  # an actor did die mid-run
    assert_same_run(run, twice_local)


def test_beam_bundle_replays_change_nothing(tmp_path, twice, twice_local, request):
    job = twice_job(tmp_path, twice)
    summary = run_engine("beam", job, request, beam_args=["--direct_runner_bundle_repeat=2"])
    assert_same_run(summary.uri, twice_local)
    assert not [p for p in Path(summary.uri).rglob("*") if ".tmp-" in p.name]


def test_beam_multi_processing_gives_the_local_rows(tmp_path, twice, twice_local, monkeypatch):
    """The DirectRunner's multi-processing mode, where flattening decoded pixels ahead of one
    RunInference once lost 55 of 320 images: the model runs in its worker processes (never in
    this one) and the rows are the local engine's."""
    here: list[int] = []
    analyse = beam_engine.analyze_decoded

    def spy(batch, model):  # seen only when a batch is analysed in this process
        here.append(len(batch))
        return analyse(batch, model)

    monkeypatch.setattr(beam_engine, "analyze_decoded", spy)
    summary = beam_engine.run_job(twice_job(tmp_path, twice), BEAM_MULTI_PROCESS)
    assert here == [], "the model ran in the test's process: not the multi-processing mode"
    assert_same_run(summary.uri, twice_local)


def ingest_cli(engine: str, args: list[str], request) -> subprocess.CompletedProcess:
    """``python -m pipelines ingest ARGS`` on ``engine``: Ray joins the session's local Ray, Beam
    runs the DirectRunner in the CLI's process."""
    args = ["ingest", "--engine", engine, "--no-progress", *args]
    if engine == "ray":
        args += ["--ray-address", request.getfixturevalue("ray_local").get_runtime_context().gcs_address]
    if engine == "beam":
        args += BEAM_IN_PROCESS  # pipeline options go last
    return run_faceaudit(args)


@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_every_image_failing_fails_the_job(engine, tmp_path, request):
    """Through the CLI: a non-zero exit, the message, no manifest."""
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(5):
        (junk / f"{i}.jpg").write_bytes(b"\xff\xd8\xff" + bytes([i]) * 50)
    out = tmp_path / "out"
    proc = ingest_cli(engine, ["--dataset", f"junk={junk}", "--out", str(out), "--run-id", "r"], request)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error:" in proc.stderr and "every one of 5 images failed" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "runs" / "r" / "_manifest.json").exists()


@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_a_model_that_cannot_load_fails_the_job(engine, tmp_path, twice, request):
    """Through the CLI: a non-zero exit, load_model's message naming the pack, no manifest."""
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(
        f"datasets: [{{name: a, source: '{twice['a']}'}}]\nout: '{out}'\nrun_id: r\nimages_per_shard: 3\n"
        f"model: {{backend: insightface, pack: '{tmp_path / 'no-such-pack'}'}}\n"
    )
    proc = ingest_cli(engine, ["--config", str(config)], request)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot load the insightface model" in proc.stderr, proc.stderr[-3000:]
    assert "no-such-pack" in proc.stderr
    assert not (out / "runs" / "r" / "_manifest.json").exists()


# ---------------------------------------------------------------- the shared photos, every engine


@pytest.fixture(scope="session")
def engine_runs(tmp_path_factory, faces_dir, faces_run, request) -> dict[str, str]:
    """The shared photos through Ray and Beam with the settings of the local ``faces_run``."""
    runs = {"local": faces_run.uri}
    for engine in ENGINES:
        out = tmp_path_factory.mktemp(f"faces-{engine}")
        job = make_job(out, ("deepface", faces_dir), run_id="faces", images_per_shard=16, workers=2)
        runs[engine] = run_engine(engine, job, request).uri
    yield runs
    for engine in ENGINES:
        shutil.rmtree(Path(runs[engine]).parent.parent, ignore_errors=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_shared_photos_give_the_same_rows_on_every_engine(engine, engine_runs):
    assert_same_run(engine_runs[engine], engine_runs["local"])
    assert len(image_rows(engine_runs[engine])) == 64


def test_the_shared_photos_give_the_same_index_on_every_engine(engine_runs, tmp_path, request):
    """Each engine's run indexed by the same engine: the bundles are identical but for the runs
    they name (their folders and manifests differ) and the time fields."""
    from indexing import build_index

    request.getfixturevalue("ray_local")
    for engine in ("local", *ENGINES):
        build_index([engine_runs[engine]], str(tmp_path / engine), OPTIONS, engine_runner(engine))
    for engine in ENGINES:
        assert_same_bundle(tmp_path / engine, tmp_path / "local", ignore=("runs",))
