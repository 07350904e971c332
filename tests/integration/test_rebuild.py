"""``faceaudit rebuild``, ``export`` and ``verify`` on the shared photos (real dlib models, small copies).

Data sets are folders of small JPEG copies of distinct shared photos, so every image has its own
bytes and the number of images decoded and embedded (the local engine's ``analyzed``) says
exactly how much work a rebuild did.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from indexing import open_index
from pipelines.cli import app
from pipelines.core import storage
from pipelines.core.locks import LOCK_NAME, SWEEP_LOCK
from pipelines.rebuild.config import RebuildConfig
from pipelines.rebuild.driver import rebuild
from tests.helpers import CLI, read_table, rebuild_config, run_faceaudit, start_faceaudit, write_small_copies

N_PHOTOS = 14


@pytest.fixture(scope="module")
def pool(tmp_path_factory, faces_dir) -> list[Path]:
    """14 distinct shared photos, at most 240 px (one or two faces each; fast to embed)."""
    folder = tmp_path_factory.mktemp("pool")
    photos = sorted(faces_dir.glob("img*.jpg"))[:N_PHOTOS]
    write_small_copies(photos, folder, 240)
    return sorted(folder.iterdir())


def dataset(root: Path, name: str, photos: list[Path], version: str = "1", removed: bool = False) -> None:
    """A registry entry ``root/registry/<name>.yaml`` and its folder ``root/data/<name>/``."""
    folder = root / "data" / name
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        shutil.copyfile(photo, folder / photo.name)
    (root / "registry").mkdir(exist_ok=True)
    spec = {"name": name, "version": version, "source": str(folder), "license": "test", "removed": removed}
    (root / "registry" / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def config(root: Path, **kw) -> RebuildConfig:
    return rebuild_config(root, **kw)


def cli_args(root: Path) -> list[str]:
    return [
        "rebuild",
        "--registry",
        str(root / "registry"),
        "--work",
        str(root / "work"),
        "--index",
        str(root / "index"),
        "--workers",
        "1",
        "--images-per-shard",
        "4",
        "--no-progress",
    ]


def face_ids(index_root: Path) -> set[int]:
    index = open_index(str(index_root))
    try:
        return {int(i) for shard in index.shards for i in shard.ids}
    finally:
        index.close()


def current(root: Path) -> str:
    return (root / "index" / "CURRENT").read_text().strip()


@pytest.fixture(scope="module")
def base(tmp_path_factory, pool) -> Path:
    """A registry of two data sets (3 photos each), rebuilt once."""
    root = tmp_path_factory.mktemp("base")
    dataset(root, "alpha", pool[0:3])
    dataset(root, "beta", pool[3:6])
    state = rebuild(config(root))
    assert state.status == "published" and state.analyzed == 6
    return root


def test_incremental_rebuild_processes_only_the_delta(tmp_path, pool):
    root = tmp_path / "inc"
    dataset(root, "a", pool[0:4])
    dataset(root, "b", pool[4:8])
    dataset(root, "c", pool[8:11])
    first = rebuild(config(root))
    assert first.status == "published" and first.analyzed == 11
    assert first.version.decision.mode == "retrain"
    # add a 4th (two new photos and a copy of one of a's), bump c (one new photo), remove b
    dataset(root, "d", [pool[11], pool[12], pool[0]])
    dataset(root, "c", [pool[13]], version="2")
    dataset(root, "b", [], removed=True)
    second = rebuild(config(root))
    assert second.status == "published"
    assert second.analyzed == 2 + 1  # d's two new photos and c's new one; nothing else decoded
    assert second.delta.summary()["ingest"] == ["c", "d"] and second.delta.removed == ["b"]
    assert second.version.decision.mode == "extend"
    # the copy of a's photo was not decoded again, yet its row keeps the photo's PDQ hash
    images = read_table(second.run_uri, "images").to_pylist()
    assert any(row["dataset"] == "d" and row["source_uri"].endswith(pool[0].name) for row in images)
    assert all(row["pdq"] is not None for row in images if row["status"] != "error")
    manifest = second.version.manifest
    assert {d["name"] for d in manifest["datasets"]} == {"a", "c", "d"}
    assert all(d["fingerprint"].startswith(d["version"] + ":") for d in manifest["datasets"])

    # the same final registry from scratch: same faces, same recall (within 0.01)
    scratch = tmp_path / "scratch"
    shutil.copytree(root / "data", scratch / "data")
    shutil.copytree(root / "registry", scratch / "registry")
    for spec in (scratch / "registry").glob("*.yaml"):
        raw = yaml.safe_load(spec.read_text())
        raw["source"] = raw["source"].replace(str(root), str(scratch))
        spec.write_text(yaml.safe_dump(raw))
    fresh = rebuild(config(scratch))
    assert fresh.analyzed == 4 + 4 + 2
    assert face_ids(root / "index") == face_ids(scratch / "index")
    assert abs(manifest["recall"]["at_10"] - fresh.version.manifest["recall"]["at_10"]) <= 0.01

    # b's faces are gone; a's first photo is listed under a and d
    index = open_index(str(root / "index"))
    try:
        occurrences = {
            o.dataset for shard in index.shards for i in shard.ids for o in index.hit(int(i), 0.0).occurrences
        }
        assert "b" not in occurrences
        row = read_table(first.run_uri, "faces").to_pylist()
        first_photo = [r for r in row if r["source_uri"].endswith(pool[0].name)][0]
        hit = index.hit(first_photo["face_id"], 0.0)
        assert {o.dataset for o in hit.occurrences} == {"a", "d"}
    finally:
        index.close()

    # nothing changed: no ingest, no new version
    third = rebuild(config(root))
    assert third.status == "up to date" and third.version is None and current(root) == second.version.version


@pytest.mark.parametrize("engine", ["ray", "beam"])
def test_rebuild_on_ray_and_beam_embeds_only_new_images(tmp_path, pool, engine):
    """The distributed engines get the current version's images too: a copy of an indexed photo
    in a new data set is listed, not decoded or embedded again."""
    root = tmp_path / engine
    dataset(root, "a", pool[0:3])
    first = rebuild(config(root))
    assert first.analyzed == 3
    before = face_ids(root / "index")
    dataset(root, "b", [pool[3], pool[0]])  # one new photo, one copy of a's first
    second = rebuild(config(root, engine=engine))
    assert second.status == "published" and second.analyzed == 1
    run = json.loads((Path(second.run_uri) / "_manifest.json").read_text())
    assert run["engine"] == engine and run["faces_from_runs"] == [Path(first.run_uri).name]
    rows = {Path(r["source_uri"]).name: r for r in read_table(second.run_uri, "images").to_pylist()}
    assert rows[pool[0].name]["n_faces"] > 0  # its result, from the first run
    assert rows[pool[0].name]["pdq"] is not None  # with its PDQ hash
    new_faces = read_table(second.run_uri, "faces").to_pylist()
    assert {Path(f["source_uri"]).name for f in new_faces} == {pool[3].name}
    assert face_ids(root / "index") == before | {f["face_id"] for f in new_faces}


# Where a rebuild is killed, by stage: (stage, kill point, images the next rebuild decodes). The
# kill points are pipelines.core.faults checkpoints; "test.rebuild.checked" is one this test adds
# (CHECKED_WRAPPER), since the driver's check step has none of its own.
REBUILD_KILLS = [
    ("ingest", "unit.after_faces_shard", 3),  # gamma's unit: faces shard committed, images not
    ("ingest", "run.before_manifest", 0),  # every unit committed, the run manifest not written
    ("build", "index.shard_written", 0),  # the new version's shard files written, no manifest
    ("build", "rebuild.before_manifest", 0),  # every bundle file written, no manifest
    ("checks", "test.rebuild.checked", 0),  # the new version opened and checked, not published
    ("current", "rebuild.before_current", 0),  # checked and caught up, CURRENT not moved
    ("current", "index.move_current", 0),  # inside move_current: CURRENT read, not yet written
]

# `python -m pipelines` with a kill point at the end of the driver's check step
CHECKED_WRAPPER = """
import sys
import pipelines.rebuild.driver as driver
from pipelines.core.faults import checkpoint
from pipelines.cli import main

checked = driver.version_problems

def version_problems(*args, **kwargs):
    problems = checked(*args, **kwargs)
    checkpoint("test.rebuild.checked")
    return problems

driver.version_problems = version_problems
sys.argv = ["faceaudit", *sys.argv[1:]]
main()
"""


def search_all(index_root: Path, queries: np.ndarray) -> tuple[str, list]:
    """(the version served, the top 5 of every query), through open_index as a consumer would."""
    index = open_index(str(index_root))  # checks every file's sha256 first
    try:
        scores, ids = index.search_ids(queries, 5)
        return index.manifest["version"], [
            [(int(i), round(float(s), 5)) for s, i in zip(rs, ri, strict=True)]
            for rs, ri in zip(scores, ids, strict=True)
        ]
    finally:
        index.close()


@pytest.mark.parametrize("stage,point,decoded", REBUILD_KILLS, ids=[f"{s}-{p}" for s, p, _ in REBUILD_KILLS])
def test_killed_rebuild_keeps_the_previous_version(tmp_path, base, pool, stage, point, decoded):
    """A rebuild SIGKILLed at any of its stages leaves the previous version serving (CURRENT
    unchanged, open_index finds the same faces), and the next rebuild resumes its ingest run and
    publishes."""
    root = tmp_path / "kill"
    shutil.copytree(base / "registry", root / "registry")
    shutil.copytree(base / "index", root / "index")
    before = current(root)
    queries = queries_from(base)
    served = search_all(root / "index", queries)
    old_faces = face_ids(root / "index")
    dataset(root, "gamma", pool[7:10])  # one unit: a photo without a face and two with one each
    entry = ["-c", CHECKED_WRAPPER] if point == "test.rebuild.checked" else CLI
    proc = run_faceaudit(cli_args(root), env={"FACEAUDIT_KILL_AT": point}, entry=entry)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert current(root) == before  # the killed rebuild's version never became CURRENT
    assert search_all(root / "index", queries) == served  # the same version serves the same faces
    assert face_ids(root / "index") == old_faces
    assert (root / "index" / LOCK_NAME).exists()  # left by the dead process
    killed_runs = sorted((root / "work" / "runs").iterdir())
    assert len(killed_runs) == 1  # the killed rebuild's ingest run, never committed or committed
    if stage == "ingest":
        assert not (killed_runs[0] / "_manifest.json").exists()
    dead = [p.name for p in (root / "index").iterdir() if p.name[:8].isdigit() and p.name > before]
    assert len(dead) == (0 if stage == "ingest" else 1)  # the killed rebuild's version folder

    state = rebuild(config(root))  # takes over the dead process's locks, resumes its run
    assert state.status == "published" and state.analyzed == decoded
    assert sorted((root / "work" / "runs").iterdir()) == killed_runs  # the same run, resumed
    assert current(root) == state.version.version != before
    new_faces = face_ids(root / "index")
    gamma = {f["face_id"] for f in read_table(killed_runs[0], "faces").to_pylist()}
    assert len(gamma) == 2 and new_faces == old_faces | gamma
    assert not (root / "index" / LOCK_NAME).exists()
    assert not (root / "index" / SWEEP_LOCK).exists()
    unpublished = [
        p.name
        for p in (root / "index").iterdir()
        if p.name[:8].isdigit() and not (p / "manifest.json").exists()
    ]
    assert unpublished == []  # a killed build's folder (it holds embeddings) never outlives the next rebuild
    if stage in ("checks", "current"):  # a committed version that never became CURRENT goes
        assert dead[0] in state.gc.deleted_versions


def test_two_rebuilds_at_once(tmp_path, base, pool):
    root = tmp_path / "two"
    shutil.copytree(base / "registry", root / "registry")
    shutil.copytree(base / "index", root / "index")
    dataset(root, "delta", pool[8:9])
    go = tmp_path / "go"
    first = start_faceaudit(cli_args(root), env={"FACEAUDIT_PAUSE_AT": f"rebuild.locked:{go}"})
    try:
        lock = root / "index" / LOCK_NAME
        deadline = time.monotonic() + 120
        while not lock.exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert lock.exists(), first.stderr.read() if first.poll() is not None else "no lock"
        second = CliRunner().invoke(app, cli_args(root))
        assert second.exit_code == 3
        assert "a rebuild is in progress" in second.output and f":{first.pid}" in second.output
    finally:
        go.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert "rebuild published" in out


def test_export_resharded_verifies_and_searches_the_same(tmp_path, base):
    runner = CliRunner()
    source = base / "index"
    exported = tmp_path / "export"
    result = runner.invoke(app, ["export", "--index", str(source), "--to", str(exported), "--shards", "2"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["verify", str(exported)]).exit_code == 0
    a, b = open_index(str(source)), open_index(str(exported))
    try:
        assert len(b.shards) == 2 and b.ntotal == a.ntotal
        queries = queries_from(base)
        sa, ia = a.search_ids(queries, 5)
        sb, ib = b.search_ids(queries, 5)
        assert np.array_equal(ia, ib) and np.allclose(sa, sb)
        assert [h.occurrences for h in a.search(queries[:1], 3)[0]] == [
            h.occurrences for h in b.search(queries[:1], 3)[0]
        ]
    finally:
        a.close()
        b.close()
    # a flipped byte is named
    victim = exported / current_of(exported) / "shard-1.faissindex"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", str(exported)])
    assert bad.exit_code == 1 and "shard-1.faissindex" in bad.output
    # a plain export (same shards) is byte-identical
    plain = runner.invoke(app, ["export", "--index", str(source), "--to", str(tmp_path / "plain")])
    assert plain.exit_code == 0 and runner.invoke(app, ["verify", str(tmp_path / "plain")]).exit_code == 0


def current_of(root: Path) -> str:
    return (root / "CURRENT").read_text().strip()


def queries_from(root: Path) -> np.ndarray:
    rows = [
        r
        for run in (root / "work" / "runs").iterdir()
        if (run / "faces").exists()
        for r in read_table(run, "faces").to_pylist()
    ]
    return np.asarray([r["embedding"] for r in rows], dtype=np.float32)


def test_reports_are_written_and_parse(base):
    reports = sorted((base / "index" / "reports").glob("*/report.json"))
    assert reports
    body = json.loads(reports[-1].read_text())
    assert body["kind"] == "rebuild" and body["status"] == "published" and body["decoded_and_embedded"] == 6
    assert body["ingest"]["per_dataset"]["alpha"]["images"] == 3
    assert sum(body["ingest"]["det_score_histogram"]["counts"]) == body["ingest"]["counts"]["faces"]
    assert body["ingest"]["throughput"][-1]["images"] == 6
    assert body["index"]["recall_by_nprobe"] and body["index"]["size_on_disk"]["index"] > 0
    html = reports[-1].with_suffix(".html").read_text()
    assert html.count("<svg") == 5 and "<script" not in html
    run_reports = list((base / "work" / "runs").glob("*/report.html"))
    assert run_reports and "Detection scores" in run_reports[0].read_text()
    text = reports[-1].read_text() + html
    assert "embedding" not in text  # counts and scores only


# ---------------------------------------------------------------- on the GCS emulator


@pytest.fixture
def gcs_bucket(gcs_emulator):
    return gcs_emulator.make_bucket(f"rebuild-{time.time_ns()}")


def test_export_and_verify_on_gcs(tmp_path, base, gcs_bucket):
    runner = CliRunner()
    target = storage.join(gcs_bucket, "exported")
    result = runner.invoke(app, ["export", "--index", str(base / "index"), "--to", target, "--shards", "2"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["verify", target]).exit_code == 0
    index = open_index(target, cache_dir=str(tmp_path / "cache"))
    try:
        assert len(index.shards) == 2 and index.ntotal == len(face_ids(base / "index"))
    finally:
        index.close()
    # and back from GCS to disk, as it is
    back = runner.invoke(app, ["export", "--index", target, "--to", str(tmp_path / "back")])
    assert back.exit_code == 0 and runner.invoke(app, ["verify", str(tmp_path / "back")]).exit_code == 0
    # a tampered object on GCS is named
    version = storage.read_text(storage.join(target, "CURRENT")).strip()
    victim = storage.join(target, version, "metadata/part-0.parquet")
    data = bytearray(storage.read_bytes(victim))
    data[len(data) // 2] ^= 0x01
    storage.write_atomic(victim, bytes(data))
    bad = runner.invoke(app, ["verify", target])
    assert bad.exit_code == 1 and "metadata/part-0.parquet" in bad.output


def test_lock_on_gcs(gcs_bucket):
    from pipelines.core.locks import ExpiringLock as RebuildLock
    from pipelines.core.locks import LockHeld

    index = storage.join(gcs_bucket, "index")
    first = RebuildLock(index, ttl_s=60, renew=False)
    first.acquire()
    with pytest.raises(LockHeld, match="a rebuild is in progress"):
        RebuildLock(index, ttl_s=60, renew=False).acquire()
    # expire it (as a holder that stopped renewing would), then a second rebuild takes it over
    stale = json.loads(storage.read_bytes(storage.join(index, LOCK_NAME)))
    stale["expires_at"] = "2000-01-01T00:00:00+00:00"
    stale["host"] = "elsewhere"  # not this host: only the expiry may free it
    _, token = storage.read_versioned(storage.join(index, LOCK_NAME))
    first.token = storage.write_if_unchanged(
        storage.join(index, LOCK_NAME), json.dumps(stale).encode(), token
    )
    second = RebuildLock(index, ttl_s=60, renew=False)
    second.acquire()
    assert second.took_over is not None and second.took_over.host == "elsewhere"
    first.refresh()  # its compare-and-swap fails: it knows it lost the lock
    assert first.lost
    first.release()  # leaves the new holder's lock alone
    assert json.loads(storage.read_bytes(storage.join(index, LOCK_NAME)))["nonce"] == second.info.nonce
    second.release()
    assert not storage.exists(storage.join(index, LOCK_NAME))


def test_rebuild_with_the_index_on_gcs(tmp_path, base, pool, gcs_bucket):
    root = tmp_path / "gcs"
    shutil.copytree(base / "registry", root / "registry")
    index = storage.join(gcs_bucket, "index")
    cfg = config(root).model_copy(
        update={"index": index, "work": storage.join(gcs_bucket, "work"), "keep_versions": 1}
    )
    first = rebuild(cfg)
    assert first.status == "published" and first.analyzed == 6
    dataset(root, "epsilon", pool[9:10])
    second = rebuild(cfg)  # extends the first version's index, downloaded from GCS
    assert second.analyzed == 1 and second.version.decision.mode == "extend"
    assert storage.read_text(storage.join(index, "CURRENT")).strip() == second.version.version
    assert first.version.version in second.gc.deleted_versions  # keep_versions 1
    assert not storage.exists(storage.join(index, LOCK_NAME))
    reports = storage.listdir(storage.join(index, "reports"))
    assert len(reports) == 2
    body = json.loads(storage.read_text(storage.join(index, "reports", reports[-1], "report.json")))
    assert body["decoded_and_embedded"] == 1 and body["index"]["rebuild"]["mode"] == "extend"


def test_the_checks_refuse_a_version_that_does_not_match(base):
    from pipelines.rebuild.driver import version_problems
    from pipelines.rebuild.plan import Source

    folder = base / "index" / current(base)
    body = json.loads((folder / "manifest.json").read_text())
    sources = {n: Source(n, "1", None, ()) for n in ("alpha", "beta")}
    assert version_problems(str(folder), body, sources, config(base)) == []
    extra = {**sources, "gamma": Source("gamma", "1", None, ())}
    strict = config(base).model_copy(deep=True)
    strict.index_settings.min_recall = 1.0
    body["recall"]["at_10"] = 0.5
    body["counts"]["faces"] += 1
    problems = version_problems(str(folder), body, extra, strict)
    assert len(problems) == 3 and "recall@10 0.500 is below 1.0" in problems[2]
