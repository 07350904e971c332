"""Every export is recorded under its index root, and every erasure sweeps every recorded export,
whether or not the eraser names it (an export left out of ``erase --export`` kept the face)."""

from __future__ import annotations

import json
import shutil

import pytest

from indexing import build_index, open_index
from indexing.erase import erase, find_by_ids
from indexing.export import export
from indexing.export_records import EXPORTS, recorded_exports


@pytest.fixture
def own_run(faces_run, tmp_path) -> str:
    """A copy of the session's run: an erasure rewrites the runs an index was built from, and the
    session's run is other tests' too."""
    copy = tmp_path / "run"
    shutil.copytree(faces_run.uri, copy)
    return str(copy)


def face_ids(index_uri: str) -> set[int]:
    index = open_index(index_uri)
    try:
        return {
            int(i)
            for s in index.shards
            for i in s.metadata.file.read(columns=["face_id"]).column(0).to_pylist()
        }
    finally:
        index.close()


def test_an_erasure_reaches_an_export_it_was_not_told_about(own_run, tmp_path):
    index, to = str(tmp_path / "index"), str(tmp_path / "export")
    build_index([own_run], index)
    export(index, to)
    assert recorded_exports(index) == [to]
    (record,) = (tmp_path / "index" / EXPORTS).iterdir()
    assert json.loads(record.read_text())["to"] == to

    victim = sorted(face_ids(to))[0]
    source = open_index(index)
    found, whole = find_by_ids(source, [victim])
    source.close()
    erase(index, found, whole_images=whole)  # no exports named

    assert victim not in face_ids(to) and victim not in face_ids(index)
    assert len(face_ids(to)) == len(face_ids(index))  # nothing else went


def test_each_destination_is_recorded_once(own_run, tmp_path):
    from indexing.export_records import record_export

    index = str(tmp_path / "index")
    build_index([own_run], index)
    export(index, str(tmp_path / "a"))
    export(index, str(tmp_path / "b"))
    record_export(index, str(tmp_path / "a"))  # again: no second record
    assert sorted(recorded_exports(index)) == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_an_erasure_rewrites_the_range_tables_of_the_index_and_its_exports(own_run, tmp_path):
    """The look-up's hash tables name images: an image erased whole leaves every table, the
    index's and an export's, and the bundles still verify (the export made before the erasure)."""
    from indexing.export import verify_bundle
    from indexing.lookup import RangeTables

    index, to = str(tmp_path / "index"), str(tmp_path / "export")
    build_index([own_run], index)
    export(index, to)
    source = open_index(index)
    victim = sorted(source.shards[0].metadata.file.read(columns=["image_sha256"]).column(0).to_pylist())[0]
    found, whole = find_by_ids(source, image_shas=[victim])
    source.close()
    erase(index, found, whole_images=whole)

    for root in (index, to):
        folder, manifest = verify_bundle(root)
        tables = RangeTables.open(folder, manifest)
        assert tables.available
        shas = {s for t in tables.tables for s in t.table.column("image_sha256").to_pylist()}
        assert victim not in shas and shas  # the erased image's hashes are gone, the others stay
