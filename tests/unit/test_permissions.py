"""Local files and folders faceaudit creates are its owner's only: files 0600, folders 0700.

Runs hold face embeddings, an index holds them again, and the erasure log's SALT is the key of
its hashes; none of them may be readable by another user of the machine. Every test runs under
the permissive umask 022, so a mode that is right here is right because of the code, not the
environment.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipelines.core import erasure, storage

FILE, DIR = 0o600, 0o700


@pytest.fixture(autouse=True)
def permissive_umask():
    before = os.umask(0o022)
    yield
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def assert_private(root: Path) -> None:
    """``root`` and everything under it: folders 0700, files 0600."""
    wrong = [
        f"{p} {oct(mode(p))}" for p in [root, *root.rglob("*")] if mode(p) != (DIR if p.is_dir() else FILE)
    ]
    assert not wrong, "created with a mode others can use: " + ", ".join(wrong)


# ---------------------------------------------------------------- the helpers


def test_make_dirs_creates_every_missing_folder_0700_and_leaves_existing_ones(tmp_path):
    existing = tmp_path / "there"
    existing.mkdir(mode=0o755)
    storage.make_dirs(str(existing / "a" / "b" / "c"))
    assert mode(existing) == 0o755  # not ours to change
    for folder in (existing / "a", existing / "a" / "b", existing / "a" / "b" / "c"):
        assert mode(folder) == DIR
    storage.make_dirs(str(existing / "a"))  # already there: nothing happens


def test_every_local_write_of_storage_is_private(tmp_path):
    root = tmp_path / "root"
    storage.write_atomic(str(root / "a" / "one.bin"), b"1")
    storage.write_atomic(str(root / "a" / "made.bin"), b"2", create_only=True)
    token = storage.read_versioned(str(root / "b" / "cas.json"))[1]
    storage.write_if_unchanged(str(root / "b" / "cas.json"), b"3", token)
    storage.download(str(root / "a" / "one.bin"), str(root / "cache" / "copy.bin"))
    made_by_a_library = tmp_path / "scratch.npy"  # faiss, numpy and pyarrow take no mode
    np.save(made_by_a_library, np.arange(3))
    assert mode(made_by_a_library) == 0o644
    storage.move_in(str(made_by_a_library), str(root / "c" / "d" / "moved.npy"))
    assert_private(root)


def test_restrict_fixes_an_older_file_and_leaves_gcs_alone(tmp_path):
    old = tmp_path / "SALT"
    old.write_text("x")
    old.chmod(0o644)
    storage.restrict(str(old))
    assert mode(old) == FILE
    storage.restrict("gs://bucket/never/touched")  # no-op, no request


# ---------------------------------------------------------------- what the commands write


def test_a_local_run_is_private(tmp_path, faces_dir):
    """A real ingest through the CLI (shards, plan, manifest, erasure pointer, reports)."""
    from pipelines.cli import app

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("img1.jpg", "img2.jpg"):
        (photos / name).write_bytes((faces_dir / name).read_bytes())
    log = tmp_path / "index" / "_erasure"
    erasure.ErasureLog(str(log)).keys(create=True)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"datasets: [{{name: p, source: '{photos}'}}]\nout: '{tmp_path / 'out'}'\nrun_id: perm\n"
        f"workers: 1\nimages_per_shard: 1\nprogress: false\nerasure_log: '{log}'\n"
        "decode: {isolate: false}\n"
    )
    result = CliRunner().invoke(app, ["ingest", "--config", str(job)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "out" / "runs" / "perm"
    names = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    assert {"_manifest.json", "_plan.json", "images/part-p-000000.parquet"} <= names
    assert_private(tmp_path / "out")
    assert_private(tmp_path / "index")


def test_an_index_build_is_private(tmp_path):
    from indexing import build_index
    from indexing.synthetic import clustered, write_run

    runs = tmp_path / "runs-out"
    write_run(str(runs), "syn", next(clustered(300, 16, clusters=10)), 16)
    build_index([str(runs)], str(tmp_path / "index"))
    index = tmp_path / "index"
    assert (index / "CURRENT").is_file()
    assert_private(index)
    assert_private(runs)


def test_the_erasure_log_and_its_key_are_private(tmp_path):
    log = erasure.ErasureLog(str(tmp_path / "index" / erasure.LOG_DIR))
    log.append([123], ["ab" * 32], ["cd" * 32])
    assert (tmp_path / "index" / erasure.LOG_DIR / erasure.SALT).is_file()
    assert_private(tmp_path / "index")


def test_an_older_world_readable_salt_is_made_private_when_read(tmp_path):
    folder = tmp_path / "log"
    log = erasure.ErasureLog(str(folder))
    log.keys(create=True)
    (folder / erasure.SALT).chmod(0o644)
    assert log.keys() is not None
    assert mode(folder / erasure.SALT) == FILE
