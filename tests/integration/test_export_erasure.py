"""Every export is recorded under its index root, and every erasure sweeps every recorded export,
whether or not the eraser names it (an export left out of ``erase --export`` kept the face)."""

from __future__ import annotations

import json

from indexing import build_index, open_index
from indexing.erase import erase, find_by_ids
from indexing.export import export
from indexing.export_records import EXPORTS, recorded_exports


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


def test_an_erasure_reaches_an_export_it_was_not_told_about(faces_run, tmp_path):
    index, to = str(tmp_path / "index"), str(tmp_path / "export")
    build_index([faces_run.uri], index)
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


def test_each_destination_is_recorded_once(faces_run, tmp_path):
    from indexing.export_records import record_export

    index = str(tmp_path / "index")
    build_index([faces_run.uri], index)
    export(index, str(tmp_path / "a"))
    export(index, str(tmp_path / "b"))
    record_export(index, str(tmp_path / "a"))  # again: no second record
    assert sorted(recorded_exports(index)) == [str(tmp_path / "a"), str(tmp_path / "b")]
