"""The run plan's unit digests: a record file's unit is its rows, not only its file name."""

from __future__ import annotations

import hashlib

import pytest

from pipelines.core.records import WorkUnit
from pipelines.core.run_plan import RunConflict, _unit_entry, check_plan, persist_plan


def _tsv_unit(span: tuple[int, ...]) -> WorkUnit:
    return WorkUnit("celeb", "/data/celeb.tsv", "msceleb-tsv", 0, ("/data/celeb.tsv",), span=span)


def _plan(unit: WorkUnit) -> dict:
    return {
        "images_per_shard": 100,
        "datasets": [
            {"name": unit.dataset, "version": "", "source": unit.source, "units": [_unit_entry(unit)]}
        ],
    }


def test_a_folder_units_digest_is_unchanged_by_the_record_fields():
    unit = WorkUnit("a", "/data/a", "folder", 0, ("/data/a/1.jpg", "/data/a/2.jpg"))
    # plans written before span/columns existed must still match on resume
    assert _unit_entry(unit)["list"] == hashlib.sha256(b"/data/a/1.jpg\n/data/a/2.jpg").hexdigest()


def test_a_record_file_that_changed_rows_is_another_plan(tmp_path):
    run = str(tmp_path / "run")
    persist_plan(run, "r1", _plan(_tsv_unit((0, 0, 4096))))
    check_plan(run, "r1", _plan(_tsv_unit((0, 0, 4096))))  # the same rows: the same plan
    with pytest.raises(RunConflict):
        check_plan(run, "r1", _plan(_tsv_unit((0, 0, 5120))))


def test_parquet_units_differ_by_their_columns():
    base = dict(dataset="hf", source="/d/x.parquet", kind="hf-parquet", index=0, items=("/d/x.parquet",))
    one = WorkUnit(**base, span=(0, 0, 0, 10), columns=("image", "id"))
    other = WorkUnit(**base, span=(0, 0, 0, 10), columns=("photo", "id"))
    assert _unit_entry(one)["list"] != _unit_entry(other)["list"]
