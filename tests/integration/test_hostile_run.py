"""A run over generated hostile inputs: each bad file is one error row, good ones are processed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipelines.core.config import DatasetSpec, JobConfig
from pipelines.engines.local_engine import run_job
from tests.helpers import image_rows, read_table
from tests.hostile import oriented_jpeg, write_corpus


def _upright_face(faces_dir: Path) -> np.ndarray:
    image = ImageOps.exif_transpose(Image.open(faces_dir / "img1.jpg")).convert("RGB")
    image.thumbnail((640, 640))
    return np.asarray(image)


def test_hostile_inputs_become_rows_and_the_run_completes(tmp_path, faces_dir):
    cases = write_corpus(tmp_path / "hostile")
    upright = _upright_face(faces_dir)
    Image.fromarray(upright).save(tmp_path / "hostile" / "upright.png")
    (tmp_path / "hostile" / "rotated.jpg").write_bytes(oriented_jpeg(upright, orientation=6))
    job = JobConfig(
        datasets=[DatasetSpec(name="hostile", source=str(tmp_path / "hostile"))],
        out=str(tmp_path / "out"), images_per_shard=5, progress=False,
    )
    summary = run_job(job)

    rows = {Path(r["source_uri"]).name: r for r in image_rows(summary.uri)}
    assert sorted(rows) == sorted([c.filename for c in cases] + ["upright.png", "rotated.jpg"])
    for case in cases:
        row = rows[case.filename]
        assert row["status"] in case.statuses, (case.filename, row)
        if case.decodes:
            assert (row["width"], row["height"]) == case.size, case.filename
        else:
            assert row["error_stage"] == case.error_stage and row["error"], case.filename
            if case.reason:
                assert case.reason in row["error"], (case.filename, row["error"])
            assert row["n_faces"] == 0

    # The EXIF-rotated photo decodes upright: its face box is the upright photo's, in rotated pixels.
    h, w = upright.shape[:2]
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (w, h)
    faces = {Path(f["source_uri"]).name: f for f in read_table(summary.uri, "faces").to_pylist()}
    assert rows["upright.png"]["n_faces"] == rows["rotated.jpg"]["n_faces"] == 1
    box, reference = np.array(faces["rotated.jpg"]["bbox"]), np.array(faces["upright.png"]["bbox"])
    assert np.abs(box - reference).max() <= 4, (box, reference)
