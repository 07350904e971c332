"""Beam's unit commit refuses a unit short of rows (it would mark the unit done for every resume)."""

import pytest

pytest.importorskip("apache_beam")

from pipelines.core.dedup import PlannedUnit  # noqa: E402
from pipelines.core.errors import FatalError  # noqa: E402
from pipelines.core.records import ImageResult, RawImage, WorkUnit  # noqa: E402
from pipelines.engines.beam_engine import CommitUnit, ReadMarker, UnitRow  # noqa: E402
from pipelines.engines.common import ModelInfo  # noqa: E402

INFO = ModelInfo("dlib-hog+dlib-resnet-v1", 128, 0.9)
UNIT = WorkUnit("d", "/src", "folder", 0, ("a.jpg", "b.jpg", "c.jpg"))


def row(position: int) -> UnitRow:
    result = ImageResult(image_sha256=f"{position:064x}", status="no_face", width=10, height=10)
    return UnitRow(position, RawImage("d", f"/src/{position}.jpg"), result, owner=True)


@pytest.mark.parametrize("positions", [[0, 2], [0, 1, 1, 2], []], ids=["lost", "repeated", "none"])
def test_a_unit_short_of_rows_is_not_committed(tmp_path, positions):
    commit = CommitUnit(str(tmp_path / "run"), "r")
    element = (0, [ReadMarker(PlannedUnit(UNIT, 0, False), 3), *map(row, positions)])
    with pytest.raises(FatalError, match=r"rows for 3 images reached the commit; not committed"):
        list(commit.process(element, INFO))
    assert not (tmp_path / "run").exists()


def test_a_whole_unit_is_committed(tmp_path):
    commit = CommitUnit(str(tmp_path / "run"), "r")
    element = (0, [row(2), ReadMarker(PlannedUnit(UNIT, 0, False), 3), row(0), row(1)])
    (tally,) = commit.process(element, INFO)
    assert tally.images == 3 and len(list((tmp_path / "run" / "images").iterdir())) == 1
