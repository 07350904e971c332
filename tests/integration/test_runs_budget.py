"""Beam's failure budget by fraction: Beam keeps no running count across workers and checks the
run's final count before the manifest (docs/reliability.md), so a run past max_error_fraction
fails there, and one within it is committed. The "every image failed" rule is test_engines.py's."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.core.config import JobConfig
from pipelines.core.errors import FatalError
from pipelines.engines import beam_engine
from tests.helpers import image_rows, make_job, manifest, write_small_copies
from tests.integration.test_engines import BEAM_IN_PROCESS

PHOTOS = ("img1.jpg", "img2.jpg")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, faces_dir) -> Path:
    folder = tmp_path_factory.mktemp("budget-photos")
    write_small_copies([faces_dir / name for name in PHOTOS], folder, max_side=320)
    return folder


def mixed(folder: Path, photos: Path, bad: int, good: int) -> Path:
    """``bad`` files of bytes that are no image and ``good`` photos, in one data set folder."""
    folder.mkdir()
    for i in range(bad):
        (folder / f"bad{i}.jpg").write_bytes(b"not an image %d" % i)
    for photo in sorted(photos.iterdir())[:good]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    return folder


def job(folder: Path, out: Path) -> JobConfig:
    """max_error_fraction 0.5 once 2 images have finished (the default minimum, 200, would keep
    the budget out of a small run)."""
    return make_job(
        out,
        ("mixed", folder),
        run_id="r",
        images_per_shard=2,
        workers=1,
        max_error_fraction=0.5,
        min_images_for_budget=2,
    )


def test_beam_fails_a_run_past_its_error_fraction(tmp_path, photos):
    # 3 of 5 fail: 0.5 x 5 = 2.5, and 3 > 2.5. Two photos are ok, so "every image failed" does
    # not apply: only the fraction can fail this run.
    folder = mixed(tmp_path / "in", photos, bad=3, good=2)
    with pytest.raises(FatalError, match=r"^3 of 5 images failed, more than max_error_fraction \(0.5\)"):
        beam_engine.run_job(job(folder, tmp_path / "out"), BEAM_IN_PROCESS)
    assert not (tmp_path / "out" / "runs" / "r" / "_manifest.json").exists()


def test_beam_commits_a_run_within_its_error_fraction(tmp_path, photos):
    # 2 of 4 fail: 0.5 x 4 = 2, and 2 is not more than 2. (2 is more than 0.5 x 2 = 1 of the
    # minimum, but the fraction is of the images finished.)
    folder = mixed(tmp_path / "in", photos, bad=2, good=2)
    summary = beam_engine.run_job(job(folder, tmp_path / "out"), BEAM_IN_PROCESS)
    counts = manifest(summary.uri)["counts"]
    assert (counts["images"], counts["error"], counts["ok"]) == (4, 2, 2)
    statuses = {Path(r["source_uri"]).name: r["status"] for r in image_rows(summary.uri)}
    assert statuses == {"bad0.jpg": "error", "bad1.jpg": "error", "img1.jpg": "ok", "img2.jpg": "ok"}
