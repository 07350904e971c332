"""What decode.memory_limit_mb is for: each decoding worker runs under RLIMIT_AS, so that an image
that needs more memory than that fails alone. Its row says why, the worker lives on, the run
completes and every other image is processed. (A bound on the workers' RSS would test nothing:
the limit guarantees it by itself.)"""

from __future__ import annotations

from pathlib import Path

from pipelines.core.config import DecodeConfig
from pipelines.engines.local_engine import run_job
from tests.helpers import image_rows, make_job, manifest, write_small_copies
from tests.hostile import png_bytes

PHOTOS = ("img1.jpg", "img2.jpg", "img3.jpg")


def test_an_image_past_the_memory_limit_fails_alone_and_the_run_goes_on(tmp_path, faces_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    # A PNG header claiming 14000 x 14000 RGB (196 Mpx, within max_pixels below) and hardly any
    # data: Pillow allocates the whole image (about 588 MB) before it reads a pixel, which a
    # worker already holding the dlib model (about 450 MB of address space) cannot get under
    # 640 MB. Named to come first: the one worker must go on to the photos after it.
    (folder / "a-oom.png").write_bytes(png_bytes(14_000, 14_000, 8, 2, b"\x00" * 1024))
    write_small_copies([faces_dir / name for name in PHOTOS], folder, max_side=320)
    job = make_job(
        tmp_path / "out",
        ("mem", folder),
        run_id="r",
        workers=1,
        decode=DecodeConfig(memory_limit_mb=640, max_pixels=200_000_000),
    )
    summary = run_job(job)

    rows = {Path(r["source_uri"]).name: r for r in image_rows(summary.uri)}
    oom = rows.pop("a-oom.png")
    assert (oom["status"], oom["error_stage"], oom["error"]) == (
        "error",
        "decode",
        "decoder ran out of memory",
    )
    assert oom["n_faces"] == 0
    assert sorted(rows) == sorted(PHOTOS)
    for name, row in rows.items():
        assert row["status"] == "ok" and row["n_faces"] >= 1, (name, row)
    counts = manifest(summary.uri)["counts"]  # the run was committed
    assert (counts["images"], counts["error"], counts["ok"]) == (4, 1, 3)
