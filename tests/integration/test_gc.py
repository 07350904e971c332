"""``faceaudit gc`` on local disk and in gs:// (fake-gcs-server): it deletes every kind of orphan,
and never what a committed manifest lists, the version CURRENT names, a file faceaudit does not
write, or anything that may still be in progress.

The runs and the index are real (``indexing.synthetic`` writes runs in the ingest engine's layout,
``build_index`` builds the bundle); the orphans are planted the way crashed writers leave them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from indexing import build_index, bundle, open_index, synthetic
from indexing.gc import parse_duration
from pipelines.cli import app
from pipelines.core import storage
from pipelines.core.orphans import in_progress

DIM = 16
SECRET = b"EMBEDDING-BYTES-THAT-MUST-NEVER-BE-PRINTED"
OLD = time.time() - 2 * 3600  # older than --older-than 1h

# rel path under the root -> (age, what gc must do). "old" files are made two hours old.
RUN_FILES = {
    "runs/done/faces/part-stray.parquet": ("old", "delete"),  # not in the manifest
    "runs/done/images/.part-x.parquet.tmp-abc": ("old", "delete"),  # a crashed write
    "runs/done/faces/part-fresh.parquet": ("new", "keep"),  # may be a live writer's
    "runs/done/notes.txt": ("old", "keep"),  # not faceaudit's
    "runs/crashed/faces/part-u1.parquet": ("old", "delete"),  # an abandoned run, whole
    "runs/crashed/images/.part-u1.parquet.tmp-1": ("old", "delete"),
    "runs/running/faces/part-u1.parquet": ("new", "keep"),  # an unfinished run still writing
}
INDEX_FILES = {
    ".CURRENT.tmp-zz": ("old", "delete"),
    "20200101T000000Z-deadbeef/shard-0.faissindex": ("old", "delete"),  # a build that never published
    "20200101T000000Z-deadbeef/store/ids-0.npy": ("old", "delete"),
    "20990101T000000Z-0badf00d/shard-0.faissindex": ("new", "keep"),  # a build in progress
    "20200103T000000Z-0000dead/.faceaudit-build.lock": ("new", "delete"),  # its build died (lock free)
    "20200103T000000Z-0000dead/shard-0.faissindex": ("new", "delete"),
    "other/thing.bin": ("old", "keep"),  # not a version folder
}


def run_gc(*args: str) -> str:
    result = CliRunner().invoke(app, ["gc", *args])
    assert result.exit_code == 0, result.output
    assert SECRET.decode() not in result.output
    return result.output


def plant(root: str, files: dict[str, tuple[str, str]]) -> None:
    for rel, (age, _) in files.items():
        uri = storage.join(root, rel)
        storage.write_atomic(uri, SECRET)
        if age == "old" and storage.is_local(uri):
            os.utime(uri, (OLD, OLD))


def deleted_lines(output: str) -> set[str]:
    return {
        line.split(" (", 1)[0].split(" ", 2)[-1]
        for line in output.splitlines()
        if line.startswith(("deleted ", "would delete ")) and " bytes): " in line
    }


def make_out_and_index(root: str) -> tuple[str, str]:
    """A committed run under ``root`` and an index of it under ``root/index``."""
    x = np.concatenate(list(synthetic.clustered(60, DIM, clusters=5)))
    synthetic.write_run(root, "done", iter([x[:30], x[30:]]), DIM)
    index = storage.join(root, "index")
    build_index([root], index)
    return root, index


def committed_files(root: str, index: str) -> dict[str, str]:
    """Every file a manifest lists, the manifests and CURRENT, with their sha256."""
    run = storage.join(root, "runs", "done")
    keep = [storage.join(run, "_manifest.json")]
    keep += [storage.join(run, s["file"]) for s in read_json(storage.join(run, "_manifest.json"))["shards"]]
    folder = storage.join(index, storage.read_text(storage.join(index, "CURRENT")).strip())
    keep += [storage.join(index, "CURRENT"), storage.join(folder, "manifest.json")]
    keep += [
        storage.join(folder, f["file"])
        for f in bundle.bundle_files(read_json(storage.join(folder, "manifest.json")))
    ]
    return {uri: storage.sha256_file(uri) for uri in keep}


def read_json(uri: str) -> dict:
    return json.loads(storage.read_text(uri))


def expected(root: str, files: dict[str, tuple[str, str]], action: str) -> set[str]:
    return {storage.join(root, rel) for rel, (_, what) in files.items() if what == action}


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800
    assert parse_duration("6h") == 6 * 3600 and parse_duration("2d") == 2 * 86400
    assert parse_duration("0") == 0 and parse_duration("1.5h") == 5400
    for bad in ("", "6 hours", "-1h", "h"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_gc_on_local_disk(tmp_path):
    root, index = make_out_and_index(str(tmp_path / "out"))
    plant(root, RUN_FILES)
    plant(index, INDEX_FILES)
    version = storage.read_text(storage.join(index, "CURRENT")).strip()
    plant(index, {f"{version}/.manifest.json.tmp-q": ("old", "delete")})
    keep = committed_files(root, index)
    locked = storage.join(index, "20200102T000000Z-cafecafe")
    plant(index, {"20200102T000000Z-cafecafe/shard-0.faissindex": ("old", "keep")})

    with in_progress(locked):  # a live build holds its folder's lock, however old its files
        for path in Path(locked).iterdir():
            os.utime(path, (OLD, OLD))
        dry = "".join(run_gc(uri, "--older-than", "1h", "--dry-run") for uri in (root, index))
        assert all(storage.exists(uri) for uri in expected(root, RUN_FILES, "delete"))
        out = "".join(run_gc(uri, "--older-than", "1h") for uri in (root, index))

    gone = {
        storage.join(root, "runs", "done", "faces", "part-stray.parquet"),
        storage.join(root, "runs", "done", "images", ".part-x.parquet.tmp-abc"),
        storage.join(root, "runs", "crashed"),
        storage.join(index, ".CURRENT.tmp-zz"),
        storage.join(index, "20200101T000000Z-deadbeef"),
        storage.join(index, "20200103T000000Z-0000dead"),
        storage.join(index, version, ".manifest.json.tmp-q"),
    }
    assert deleted_lines(dry) == gone == deleted_lines(out)
    assert not [uri for uri in gone if storage.exists(uri)]
    kept = expected(root, RUN_FILES, "keep") | expected(index, INDEX_FILES, "keep") | {locked}
    assert all(storage.exists(uri) for uri in kept)
    assert {uri: storage.sha256_file(uri) for uri in keep} == keep
    open_index(index).close()  # every file's sha256 checked


def test_gc_keeps_the_version_current_names_even_without_a_manifest(tmp_path):
    index = tmp_path / "index"
    (index / "20200101T000000Z-deadbeef").mkdir(parents=True)
    (index / "20200101T000000Z-deadbeef" / "shard-0.faissindex").write_bytes(SECRET)
    (index / "CURRENT").write_text("20200101T000000Z-deadbeef\n")
    assert "deleted 0 file(s)" in run_gc(str(index), "--older-than", "0")
    assert (index / "20200101T000000Z-deadbeef" / "shard-0.faissindex").exists()


def test_gc_in_gcs(gcs_emulator):
    root, index = make_out_and_index(storage.join(gcs_emulator.make_bucket("faceaudit-gc"), "out"))
    plant(root, RUN_FILES)
    plant(index, INDEX_FILES)
    keep = committed_files(root, index)
    # GCS sets modification times itself: everything planted is new, so 1h deletes nothing ...
    assert "deleted 0 file(s)" in run_gc(root, "--older-than", "1h") + run_gc(index, "--older-than", "1h")
    # ... and 0 (nothing is in progress) deletes every orphan, whatever its age
    out = run_gc(root, "--older-than", "0") + run_gc(index, "--older-than", "0")
    gone = {
        uri
        for uri in expected(root, RUN_FILES, "delete") | expected(index, INDEX_FILES, "delete")
        if "/crashed/" not in uri and "dead" not in uri
    }
    gone |= {
        storage.join(root, "runs", "crashed"),
        storage.join(index, "20200101T000000Z-deadbeef"),
        storage.join(index, "20200103T000000Z-0000dead"),
        storage.join(root, "runs", "done", "faces", "part-fresh.parquet"),
        storage.join(root, "runs", "running"),
        storage.join(index, "20990101T000000Z-0badf00d"),
    }
    assert deleted_lines(out) == gone
    assert not [uri for uri in gone if storage.exists(uri)]
    assert storage.exists(storage.join(root, "runs", "done", "notes.txt"))
    assert storage.exists(storage.join(index, "other", "thing.bin"))
    assert {uri: storage.sha256_file(uri) for uri in keep} == keep
    open_index(index).close()
