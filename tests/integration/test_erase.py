"""Erasure on real photos: erase a person by photo, then read every file back and search again.

One small ingest of 18 shared photos (480 px copies; dlib on the local engine) and two bundles
built from it, an exact one (the index) and an IVF-PQ one with a float16 re-rank store (used as an
export), make the pristine tree. Each test works on a copy of it, with relative paths inside, so
the manifests' run URIs point into the copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexing import BuildOptions, build_index, open_index
from indexing.erase import PENDING, erase, find_by_ids, find_by_photos
from pipelines.core import erasure, storage
from pipelines.core.config import DecodeConfig
from pipelines.engines.local_engine import run_job
from tests.helpers import REPO, largest_face_embeddings, make_job, run_faceaudit, write_small_copies

PERSON = ["img1", "img2", "img4", "img5", "img6", "img7", "img10", "img11"]  # one person (master.csv)
OTHERS = ["img3", "img12", "img13", "img14", "img15", "img16", "img17", "img8", "img9"]  # four other people
PHOTOS = [*PERSON, *OTHERS, "couple"]


def ingest(root: Path, run_id: str, log: str | None = None):
    # decode runs in this process: small trusted copies, and no worker start-up per test
    job = make_job(
        "out",
        ("deepface", "photos"),
        run_id=run_id,
        images_per_shard=8,
        workers=1,
        erasure_log=log,
        decode=DecodeConfig.model_validate({"isolate": False}),
    )
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return run_job(job)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, faces_dir) -> Path:
    root = tmp_path_factory.mktemp("erase-pristine")
    (root / "photos").mkdir()
    write_small_copies([faces_dir / f"{name}.jpg" for name in PHOTOS], root / "photos", 480)
    ingest(root, "r1")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        build_index(["out"], "index")
        # a PQ bundle with a float16 store, erased as an export that the operator names
        build_index(["out"], "export", BuildOptions(max_bytes_per_vector=24, flat_max=1, nlist=1))
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def work(pristine, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "w"
    shutil.copytree(pristine, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default bundle cache, purged by erase
    return root


def faces_table(root: Path) -> pa.Table:
    parts = sorted((root / "out" / "runs").glob("*/faces/*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


@pytest.fixture(scope="module")
def queries(pristine) -> dict[str, np.ndarray]:
    """Photo name -> its largest face's embedding, as the ingest computed it (no model load per search)."""
    vectors = largest_face_embeddings(pristine / "out" / "runs" / "r1")
    return {name.removesuffix(".jpg"): vec for name, vec in vectors.items()}


def matches(index, vector: np.ndarray) -> list[tuple[int, float]]:
    """Every indexed face at or above the model's calibrated threshold, as `faceaudit search` keeps them."""
    hits = index.search(vector, k=index.ntotal)[0]
    return [(h.face_id, round(h.score, 5)) for h in hits if h.score >= index.match_threshold]


def every_id_and_vector(root: Path) -> tuple[set[int], list[np.ndarray], list[str]]:
    """Every face_id and vector in every table and index file under the tree, read back decompressed
    (pyarrow, numpy, faiss); and the text of every JSON file."""
    ids: set[int] = set()
    vectors: list[np.ndarray] = []
    texts: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "photos" not in p.parts):
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            for name in table.column_names:
                column = table.column(name)
                if name == "face_id":
                    ids.update(column.to_pylist())
                elif name == "embedding":
                    vectors.append(np.asarray(column.to_pylist(), dtype=np.float32))
                else:
                    texts.append(json.dumps(column.to_pylist(), default=str))
        elif path.suffix == ".npy":
            array = np.load(path)
            if array.ndim == 1:
                ids.update(int(i) for i in array)
            else:
                vectors.append(array.astype(np.float32))
        elif path.suffix == ".faissindex":
            index = faiss.read_index(str(path))
            ids.update(int(i) for i in faiss_ids(index))
            if isinstance(index, faiss.IndexIDMap):
                vectors.append(index.index.reconstruct_n(0, index.ntotal))
        elif path.suffix in (".json", "") or path.name == "CURRENT":
            texts.append(path.read_text(errors="replace"))
    return ids, vectors, texts


def faiss_ids(index) -> np.ndarray:
    if isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map)
    ivf = faiss.extract_index_ivf(index)
    lists = [
        faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy()
        for i in range(ivf.nlist)
        if ivf.invlists.list_size(i)
    ]
    return np.concatenate(lists) if lists else np.zeros(0, np.int64)


def assert_gone(root: Path, erased_ids: set[int], erased_vectors: np.ndarray) -> None:
    ids, vectors, texts = every_id_and_vector(root)
    assert ids and not ids & erased_ids
    for block in vectors:
        if len(block):  # float16 copies differ from the float32 originals by ~1e-3
            assert (block @ erased_vectors.T).max() < 0.999
    for face_id in erased_ids:
        assert not any(str(face_id) in text for text in texts)


def erased_faces(root: Path, vector: np.ndarray) -> tuple[set[int], np.ndarray]:
    """The faces erasing by a photo must take: every indexed face matching it, with their vectors."""
    index = open_index("index")
    ids = {face_id for face_id, _ in matches(index, vector)}
    faces = faces_table(root)
    rows = [i for i, f in enumerate(faces.column("face_id").to_pylist()) if f in ids]
    return ids, np.asarray(faces.take(rows).column("embedding").to_pylist(), dtype=np.float32)


def test_erase_by_photo_leaves_no_trace_and_other_people_unchanged(work, queries):
    from typer.testing import CliRunner

    from pipelines.cli import app

    ids, vectors = erased_faces(work, queries["img1"])
    assert len(ids) >= len(PERSON)  # every photo of the person, and the person in couple.jpg
    before = open_index("index")
    others = {p: matches(before, queries[p]) for p in OTHERS}
    assert all(others.values())
    # a download cache holding these faces (as a remote index leaves behind) is purged too
    cache = work.parent / "home" / ".cache" / "faceaudit" / "index" / "old-version"
    shutil.copytree(Path(before.folder) / "store", cache / "store")
    result = CliRunner().invoke(
        app,
        ["erase", "--index", "index", "--photo", "photos/img1.jpg", "--export", "export", "--yes", "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{\n") :])
    assert report["run_faces_removed"] == len(ids) and sorted(report["bundle_faces_removed"].values()) == [
        len(ids),
        len(ids),
    ]
    assert report["caches_removed"] == [str(cache)] and not cache.exists()
    after = open_index("index")
    assert after.ntotal == before.ntotal - len(ids)
    for photo in PERSON:
        assert not {face_id for face_id, _ in matches(after, queries[photo])} & ids
    assert not set(after.search_ids(queries["img1"], after.ntotal)[1][0]) & ids  # k = every face
    assert {p: matches(after, queries[p]) for p in OTHERS} == others
    assert_gone(work, ids, vectors)
    log_text = "".join(p.read_text() for p in (work / "index" / "_erasure").rglob("*.json"))
    assert "img1" not in log_text and "photos" not in log_text
    assert faces_table(work).num_rows == before.ntotal - len(ids)


def test_reingest_and_rebuild_do_not_bring_them_back(work, pristine, queries):
    index = open_index("index")
    found = find_by_photos(index, ["photos/img2.jpg"])
    ids = {f.face_id for f in found}
    assert len(ids) >= 2
    erase("index", found)
    log = erasure.default_log("index")
    again = ingest(work, "r2", log=log)  # the same data set, ingested again with the log
    r2 = pq.read_table(work / "out" / "runs" / "r2" / "faces").column("face_id").to_pylist()
    assert r2 and not set(r2) & ids and again.manifest["counts"]["images"] == len(PHOTOS)
    # an un-erased copy of the old run turning up again (restored from a backup) is not indexed either
    shutil.copytree(pristine / "out" / "runs" / "r1", work / "out" / "runs" / "r0")
    built = build_index(["out"], "index")
    assert built.manifest["counts"]["erased"] == len(ids)
    fresh = open_index("index")
    assert fresh.manifest["version"] == built.version and fresh.ntotal == index.ntotal - len(ids)
    ids_on_disk = set(np.load(Path(built.folder) / "store" / "ids-0.npy").tolist())
    assert not ids_on_disk & ids
    for photo in PERSON:
        assert not {face_id for face_id, _ in matches(fresh, queries[photo])} & ids
    swept = open_index(str(Path("index") / index.manifest["version"]))  # the version erased in place
    assert swept.manifest["erasure"]["faces_removed"] == len(ids)


def log_only(index, face_ids: set[int]) -> None:
    """Log an erasure as `erase` does first, without sweeping: the files still hold the faces."""
    from indexing.erase import log_faces

    found, _ = find_by_ids(index, sorted(face_ids))
    assert {f.face_id for f in found} == face_ids
    log_faces(erasure.ErasureLog(erasure.default_log("index")), found)


def bundle_ids(root: str) -> set[int]:
    """Every face_id in the id lists and metadata of the version a bundle root's CURRENT names."""
    index = open_index(root)
    try:
        ids = {int(i) for shard in index.shards for i in shard.ids}
        meta = {
            f for shard in index.shards for f in shard.metadata.file.read(["face_id"]).column(0).to_pylist()
        }
        assert ids == meta
        return ids
    finally:
        index.close()


@pytest.mark.parametrize("shards", [None, 2], ids=["as-is", "resharded"])
def test_an_export_leaves_out_the_faces_the_log_names(work, queries, shards):
    """Faces logged for erasure (the sweep not yet run: the index still holds them) never reach an
    export: not in its FAISS files, id lists, metadata or float16 store."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    index = open_index("index")
    ids, vectors = erased_faces(work, queries["img5"])
    others = {p: matches(index, queries[p]) for p in OTHERS}
    log_only(index, ids)
    assert ids <= bundle_ids("index")  # logged, not swept
    args = ["export", "--index", "index", "--to", "exported"]
    result = CliRunner().invoke(app, args + ([] if shards is None else ["--shards", str(shards)]))
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(app, ["verify", "exported"]).exit_code == 0
    exported = open_index("exported")  # its own root: no erasure log filters it
    assert exported.ntotal == index.ntotal - len(ids)
    assert len(exported.shards) == (shards or len(index.shards))
    assert bundle_ids("exported") == bundle_ids("index") - ids
    assert not set(exported.search_ids(queries["img5"], exported.ntotal)[1][0]) & ids
    assert {p: matches(exported, queries[p]) for p in OTHERS} == others
    assert_gone(work / "exported", ids, vectors)  # every file of the export, read back


def test_a_long_lived_index_drops_an_erasure_logged_after_it_opened(work, queries, monkeypatch):
    """An Index kept open (a service) picks up an entry logged by another process within its recheck
    period (docs: 10 s). The period is counted on search.time.monotonic, moved by the test."""
    import types

    import indexing.search as search

    clock = [1_000.0]
    monkeypatch.setattr(search, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    index = open_index("index")  # opened before the erasure, and kept open
    ids = {face_id for face_id, _ in matches(index, queries["img5"])}
    assert len(ids) >= len(PERSON)
    others = {p: matches(index, queries[p]) for p in OTHERS}
    log_only(open_index("index"), ids)  # another process logs the erasure
    clock[0] += 10.0  # the documented recheck period, and not a second more
    for photo in PERSON:
        assert not {face_id for face_id, _ in matches(index, queries[photo])} & ids
    assert not set(index.search_ids(queries["img5"], index.ntotal)[1][0]) & ids
    assert {p: matches(index, queries[p]) for p in OTHERS} == others


def test_the_run_manifest_counts_erased_faces(work, queries):
    """After each sweep the run manifest's counts.faces_erased adds the faces it took from the
    run's shards, and counts.faces is what the shards hold; images rows keep their n_faces."""
    run = work / "out" / "runs" / "r1"
    pristine_manifest = json.loads((run / "_manifest.json").read_text())
    assert not pristine_manifest["counts"].get("faces_erased")
    images = pq.read_table(run / "images").sort_by("source_uri")
    index = open_index("index")
    person = {face_id for face_id, _ in matches(index, queries["img1"])}
    other = {face_id for face_id, _ in matches(index, queries["img13"])} - person
    assert person and other
    total = pristine_manifest["counts"]["faces"]
    erased = 0
    for ids in (person, other):  # two erasures: the count adds up
        found, _ = find_by_ids(open_index("index"), sorted(ids))
        report = erase("index", found)
        assert report.run_faces_removed == len(ids)
        erased += len(ids)
        manifest = json.loads((run / "_manifest.json").read_text())
        assert manifest["counts"]["faces_erased"] == erased
        assert manifest["counts"]["faces"] == total - erased == faces_table(work).num_rows
        assert manifest["counts"]["images"] == pristine_manifest["counts"]["images"]
        assert pq.read_table(run / "images").sort_by("source_uri").equals(images)


@pytest.mark.parametrize("flag", ["--image-sha256", "--source-uri"])
def test_erase_by_image_takes_that_image_and_nothing_else(work, flag):
    """`erase --image-sha256` / `--source-uri` remove every face of the one image (here the two of
    couple.jpg) from the runs, the index and the export, and leave every other face as it was."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    faces = faces_table(work)
    rows = faces.to_pylist()
    target = [r for r in rows if Path(r["source_uri"]).name == "couple.jpg"]
    gone = {r["face_id"] for r in target}
    assert len(gone) == 2
    value = target[0]["image_sha256"] if flag == "--image-sha256" else target[0]["source_uri"]
    kept = sorted((r for r in rows if r["face_id"] not in gone), key=lambda r: r["face_id"])
    index_ids, export_ids = bundle_ids("index"), bundle_ids("export")
    assert gone <= index_ids and gone <= export_ids
    images = pq.read_table(work / "out" / "runs" / "r1" / "images").sort_by("source_uri")
    result = CliRunner().invoke(
        app, ["erase", "--index", "index", "--export", "export", flag, value, "--yes", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{\n") :])
    assert report["run_faces_removed"] == 2
    after = sorted(faces_table(work).to_pylist(), key=lambda r: r["face_id"])
    assert after == kept  # every other face row untouched, in the run shards
    assert pq.read_table(work / "out" / "runs" / "r1" / "images").sort_by("source_uri").equals(images)
    assert bundle_ids("index") == index_ids - gone and bundle_ids("export") == export_ids - gone
    index = open_index("index")
    vectors = np.asarray([r["embedding"] for r in kept], dtype=np.float32)
    top = index.search_ids(vectors, 1)[1][:, 0]
    assert top.tolist() == [r["face_id"] for r in kept]  # every other face is still found, as itself
    lost = np.asarray([r["embedding"] for r in target], dtype=np.float32)
    assert not set(index.search_ids(lost, index.ntotal)[1].ravel().tolist()) & gone


def test_an_erasure_logged_during_a_build_is_swept_before_current_moves(work, queries, monkeypatch):
    """An eraser that logs after a build read the log waits for the build's sweep lock; the build
    sweeps the entry itself before CURRENT moves, so the new version never serves the faces."""
    import indexing.build as build
    from indexing.erase import log_faces

    index = open_index("index")
    found = find_by_photos(index, ["photos/img4.jpg"])
    ids = {f.face_id for f in found}
    assert ids
    scan = build.scan_ids

    def scan_then_erase(*args, **kwargs):
        inputs = scan(*args, **kwargs)  # the log is read: nothing erased yet
        log_faces(erasure.ErasureLog(erasure.default_log("index")), found)  # an eraser logs, then waits
        return inputs

    monkeypatch.setattr(build, "scan_ids", scan_then_erase)
    built = build_index(["out"], "index")
    assert built.manifest["counts"].get("erased", 0) == 0  # the scan did index the faces
    fresh = open_index("index")
    assert fresh.manifest["version"] == built.version
    assert fresh.manifest["erasure"]["faces_removed"] == len(ids)  # swept before CURRENT moved
    assert not set(fresh.search_ids(queries["img4"], fresh.ntotal)[1][0]) & ids
    stores = list((Path(built.folder) / "store").glob("ids-*.npy"))  # revised names after a sweep
    assert stores and not {int(i) for p in stores for i in np.load(p)} & ids
    assert not set(faces_table(work).column("face_id").to_pylist()) & ids  # the runs were swept too
    assert not (work / "index" / "_erase.lock").exists()


def test_erasure_sweeps_of_one_index_take_turns(work, monkeypatch):
    """A second sweep finds the lock held, waits, and gets it only once the first let it go. Driven
    by events: sweep_lock's pause between tries returns when the first holder has released."""
    import threading
    import types

    from pipelines.core import locks
    from pipelines.core.errors import FatalError
    from pipelines.core.locks import sweep_lock

    held, release, waiting, released = (threading.Event() for _ in range(4))
    order: list[str] = []
    errors: list[BaseException] = []
    clock = [0.0]  # sweep_lock's clock: moves only by its own pauses, so a wait never times out early

    def pause(seconds: float) -> None:  # sweep_lock's sleep between tries
        waiting.set()
        clock[0] += seconds
        assert released.wait(60), "the first holder never released the lock"

    monkeypatch.setattr(locks, "time", types.SimpleNamespace(monotonic=lambda: clock[0], sleep=pause))

    def first():
        with sweep_lock("index"):
            held.set()
            assert release.wait(60)
            order.append("first done")
        released.set()

    def second():
        try:
            with sweep_lock("index"):  # waits for the first
                order.append("second")
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            errors.append(exc)
        finally:
            waiting.set()  # a second that ends without waiting must not leave the test waiting

    one = threading.Thread(target=first)
    one.start()
    assert held.wait(60)
    with pytest.raises(FatalError, match="an erasure sweep is in progress"):
        with sweep_lock("index", wait_s=0):
            pass
    two = threading.Thread(target=second)
    two.start()
    assert waiting.wait(60)  # the second tried, found the lock held and is waiting
    assert not errors and order == []
    release.set()
    one.join()
    two.join()
    assert not errors, errors
    assert order == ["first done", "second"]
    assert not (work / "index" / "_erase.lock").exists()


KILL_POINTS = ["erase.logged", "erase.run_shard", "erase.bundle_files", "erase.bundle_manifest"]


def test_killed_erase_completes_when_run_again(work, queries):
    index = open_index("index")
    found, _ = find_by_ids(index, [m[0] for m in matches(index, queries["img4"])])
    ids = sorted({f.face_id for f in found})
    _, vectors = erased_faces(work, queries["img4"])
    command = [
        "erase",
        "--index",
        "index",
        "--export",
        "export",
        "--yes",
        *(a for i in ids for a in ("--face-id", str(i))),
    ]
    env = {"PYTHONPATH": str(REPO)}
    for point in KILL_POINTS:  # each run is killed one step further on, from what the last one left
        done = run_faceaudit(command, cwd=work, env={**env, "FACEAUDIT_KILL_AT": point})
        assert done.returncode == -9, (point, done.stderr[-2000:])
        # half-erased: whatever is on disk, the logged faces are never returned
        for photo in ("img4", "img1"):
            assert not {face_id for face_id, _ in matches(open_index("index"), queries[photo])} & set(ids)
    done = run_faceaudit(command, cwd=work, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    complete = open_index("index")  # every listed file present, every sha256 right
    assert complete.ntotal == index.ntotal - len(ids)
    from indexing.runs import find_runs, verify_shard

    (run,) = find_runs(["out"])
    for shard in [*run.faces, *run.images]:
        verify_shard(shard)
    assert complete.manifest["runs"][0]["manifest_sha256"] == run.manifest_sha256
    assert run.manifest["counts"]["faces"] == sum(s.rows for s in run.faces) == complete.ntotal
    assert_gone(work, set(ids), vectors)
    leftovers = [p for p in work.rglob("*") if storage.TMP_MARK in p.name or p.name == PENDING]
    assert not leftovers
    assert sorted(p.name for p in Path(complete.folder).rglob("*") if p.is_file()) == sorted(
        [
            "manifest.json",
            *(
                Path(e["file"]).name
                for s in complete.manifest["shards"]
                for e in (s["index"], s["ids"], s["metadata"], s["hashes"])
            ),
            # the copies table and its range hashes, rewritten without the erased image
            *(Path(complete.manifest["copies"][key]["file"]).name for key in ("table", "hashes")),
        ]
    )


# ---------------------------------------------------------------- GCS (fake-gcs-server)


def upload_tree(local: Path, uri: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_atomic(storage.join(uri, path.relative_to(local).as_posix()), path.read_bytes())


def download_tree(uri: str, local: Path) -> None:
    prefix = uri.rstrip("/") + "/"
    for item in storage.walk_files(uri):
        storage.download(item, str(local / item[len(prefix) :]))


def noncurrent(uri: str) -> list[str]:
    from pipelines.core import gcs

    return [f"{item}#{g}" for item in storage.walk_files(uri) for g in gcs.generations(item)[1]]


def deletes_noncurrent_generations(emulator) -> bool:
    """Whether the emulator deletes exactly the noncurrent generation a DELETE names (GCS does)."""
    bucket = "probe-versions"
    emulator.make_bucket(bucket, versioning=True)
    first = int(emulator.upload(bucket, "o", b"one", 0).json()["generation"])
    emulator.upload(bucket, "o", b"two", first)
    emulator.http.delete(f"{emulator.url}/storage/v1/b/{bucket}/o/o", params={"generation": first})
    live = emulator.http.get(f"{emulator.url}/storage/v1/b/{bucket}/o/o", params={"alt": "media"})
    old = emulator.http.get(
        f"{emulator.url}/storage/v1/b/{bucket}/o/o", params={"alt": "media", "generation": first}
    )
    return live.ok and live.content == b"two" and old.status_code == 404


@pytest.mark.parametrize("versioned", [False, True], ids=["plain-bucket", "versioned-bucket"])
def test_erase_on_gcs(gcs_emulator, pristine, queries, tmp_path, monkeypatch, versioned):
    if versioned and not deletes_noncurrent_generations(gcs_emulator):
        pytest.skip(
            "fake-gcs-server ignores the generation of a DELETE and removes the live object "
            "instead (probed), so deleting noncurrent versions cannot be tested on it"
        )
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    name = "faceaudit-erase-versioned" if versioned else "faceaudit-erase"
    root = gcs_emulator.make_bucket(name, versioning=versioned)
    upload_tree(pristine / "out" / "runs" / "r1", storage.join(root, "out", "runs", "r1"))
    build_index([storage.join(root, "out")], storage.join(root, "index"))
    cache = tmp_path / "cache"
    index = open_index(storage.join(root, "index"), cache_dir=str(cache))
    ids = {face_id for face_id, _ in matches(index, queries["img5"])}
    rows = pq.read_table(pristine / "out" / "runs" / "r1" / "faces")
    pairs = zip(rows.column("face_id").to_pylist(), rows.column("embedding").to_pylist(), strict=True)
    vectors = np.asarray([e for f, e in pairs if f in ids], dtype=np.float32)
    found, _ = find_by_ids(index, sorted(ids))
    report = erase(storage.join(root, "index"), found, cache_dirs=[str(cache)])
    assert report.run_faces_removed == len(ids) and report.caches_removed and not list(cache.iterdir())
    # the old index, ids, metadata and hash-table files of the one shard, the copies table and its hashes
    assert report.files_deleted == 6
    fresh = open_index(storage.join(root, "index"), cache_dir=str(tmp_path / "cache2"))
    assert fresh.ntotal == index.ntotal - len(ids)
    for photo in PERSON:
        assert not {face_id for face_id, _ in matches(fresh, queries[photo])} & ids
    copy = tmp_path / "bucket"
    download_tree(root, copy)
    assert_gone(copy, ids, vectors)
    assert not noncurrent(root)  # no older generation of any object is left to read back
    assert (report.noncurrent_deleted > 0) == versioned


def test_a_rebuild_that_reingests_the_data_set_does_not_bring_them_back(tmp_path, faces_dir, monkeypatch):
    import yaml

    from pipelines.rebuild.config import RebuildConfig
    from pipelines.rebuild.driver import rebuild

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    photos = tmp_path / "data"
    photos.mkdir()
    write_small_copies([faces_dir / f"{n}.jpg" for n in ("img1", "img2", "img3", "img12")], photos, 240)
    registry = tmp_path / "registry"
    registry.mkdir()

    def register(version: str) -> None:
        spec = {"name": "deepface", "version": version, "source": str(photos), "license": "test"}
        (registry / "deepface.yaml").write_text(yaml.safe_dump(spec))

    config = RebuildConfig(
        registry=str(registry),
        work=str(tmp_path / "work"),
        index=str(tmp_path / "index"),
        workers=1,
        progress=False,
        images_per_shard=2,
        decode=DecodeConfig.model_validate({"isolate": False}),
    )
    register("1")
    rebuild(config)
    index = open_index(config.index)
    vectors = run_vectors(tmp_path / "work")
    person = {
        h.face_id
        for h in index.search(vectors["img1.jpg"], k=index.ntotal)[0]
        if h.score >= index.match_threshold
    }
    assert len(person) == 2  # img1 and img2
    found, _ = find_by_ids(index, sorted(person))
    erase(config.index, found)
    register("2")  # the data set changed: the rebuild ingests all of it again
    rebuild(config)
    fresh = open_index(config.index)
    assert fresh.manifest["version"] != index.manifest["version"] and fresh.ntotal == index.ntotal - 2
    assert not set(fresh.search_ids(vectors["img2.jpg"], fresh.ntotal)[1][0]) & person
    runs = sorted((tmp_path / "work" / "runs").glob("*/faces"))
    assert len(runs) == 2  # the first run, erased in place, and the rebuild's new one
    assert pq.read_table(runs[1].parent / "images").num_rows == 4  # which took every photo again
    for faces in runs:
        assert not set(pq.read_table(faces).column("face_id").to_pylist()) & person


def run_vectors(work: Path) -> dict[str, np.ndarray]:
    """Photo file name -> its largest face's embedding, from the first run under ``work``."""
    (run,) = sorted((work / "runs").iterdir())[:1]
    return largest_face_embeddings(run)
