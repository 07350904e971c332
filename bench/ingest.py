"""Ingest throughput on the test photos, against baselines run in the same command.

    .venv/bin/python bench/ingest.py [--copies 5] [--naive 24] [--sweep] [--isolation]

The test photos (tests/data/faces, or the folder in $FACEAUDIT_FACES) are replicated (re-encoded,
so every copy is new bytes) to --copies x 64 images in .bench/ingest-photos-<copies>. Printed, as
images/s, faces/s and ratios:

* engine: the local engine with its default settings (all cores);
* (a) careful loop: one process, the same models and settings (decode, downscale for detection,
  landmarks and descriptor at full resolution), one image after another;
* (b) naive loop: what face_recognition users write: load at full resolution, HOG with one
  upsample, 5-point landmarks, descriptor; run on the first --naive images only (it is slow);
* bare models: detection and embedding alone over pre-decoded images, to show where time goes.

--sweep also tries detection sizes and reports which find a face in every one of the test photos.
--isolation only runs the engine with isolated decoding and without, alternately, twice each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import photos  # noqa: E402  (bench/photos.py, beside this script)

from pipelines.core.config import DatasetSpec, DecodeConfig, JobConfig, ModelConfig  # noqa: E402
from pipelines.core.decode import decode_image, downscale  # noqa: E402
from pipelines.core.models import load_model  # noqa: E402
from pipelines.core.stages import analyze_bytes  # noqa: E402


def replicate(copies: int) -> Path:
    return photos.replicate(copies, "ingest")


def rate(n_images: int, n_faces: int, seconds: float) -> tuple[float, float]:
    return n_images / seconds, n_faces / seconds


def run_engine(folder: Path, isolate: bool = True) -> tuple[int, int, float]:
    from pipelines.core.config import DecodeConfig as Decode
    from pipelines.engines.local_engine import run_job

    out = tempfile.mkdtemp(prefix="bench-ingest-")
    job = JobConfig(
        datasets=[DatasetSpec(name="bench", source=str(folder))],
        out=out,
        progress=False,
        decode=Decode(isolate=isolate),
    )
    started = time.perf_counter()
    summary = run_job(job)
    seconds = time.perf_counter() - started
    counts = summary.manifest["counts"]
    return counts["images"], counts["faces"], seconds


def careful_loop(paths: list[Path], config: ModelConfig) -> tuple[int, int, float]:
    model = load_model(config)
    decode = DecodeConfig()
    started = time.perf_counter()
    faces = sum(analyze_bytes(p.read_bytes(), model, decode).n_faces for p in paths)
    return len(paths), faces, time.perf_counter() - started


def naive_loop(paths: list[Path]) -> tuple[int, int, float]:
    """face_recognition.load_image_file + face_locations + face_encodings, written with dlib."""
    import dlib

    from pipelines.core.models.dlib_backend import weight_file

    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(weight_file("shape_predictor_5_face_landmarks.dat"))
    encoder = dlib.face_recognition_model_v1(weight_file("dlib_face_recognition_resnet_model_v1.dat"))
    started = time.perf_counter()
    faces = 0
    for path in paths:
        image = np.array(Image.open(path).convert("RGB"))
        for rect in detector(image, 1):
            shape = landmarks(image, rect)
            np.array(encoder.compute_face_descriptor(image, shape, 1))
            faces += 1
    return len(paths), faces, time.perf_counter() - started


def bare_models(paths: list[Path], config: ModelConfig) -> dict[str, float]:
    """Seconds per image of each part, over images decoded beforehand."""
    model = load_model(config)
    decoded = [decode_image(p.read_bytes(), DecodeConfig().max_pixels) for p in paths]
    started = time.perf_counter()
    for path in paths:
        decode_image(path.read_bytes(), DecodeConfig().max_pixels)
    t_decode = time.perf_counter() - started
    started = time.perf_counter()
    smalls = [downscale(image, config.detect_max_side) for image in decoded]
    t_scale = time.perf_counter() - started
    started = time.perf_counter()
    found = [model._detect(image) for image in decoded]  # noqa: SLF001 - timing the parts
    t_detect = time.perf_counter() - started - t_scale
    started = time.perf_counter()
    n_faces = 0
    for image, (boxes, scores) in zip(decoded, found, strict=True):
        if boxes:
            n_faces += len(model._embed(image, boxes, scores))  # noqa: SLF001
    t_embed = time.perf_counter() - started
    del smalls
    n = len(paths)
    return {
        "decode s/image": t_decode / n,
        "downscale s/image": t_scale / n,
        "detect s/image": t_detect / n,
        "embed s/face": t_embed / max(n_faces, 1),
    }


def compare_isolation(folder: Path) -> None:
    """The engine with decode.isolate on and off, twice each, alternately (the machine's load
    drifts; alternating spreads the drift over both)."""
    print(f"\n{'local engine':34s} {'images':>7s} {'faces':>6s} {'seconds':>8s} {'images/s':>9s}")
    for isolate in (False, True, False, True):
        n, f, s = run_engine(folder, isolate)
        name = "isolated decoding" if isolate else "decoding in the pool (no limits)"
        print(f"{name:34s} {n:7d} {f:6d} {s:8.1f} {n / s:9.2f}", flush=True)


def sweep(config: ModelConfig) -> None:
    originals = sorted(photos.faces_dir().glob("*.jpg"))
    datas = [p.read_bytes() for p in originals]
    print(f"\ndetection size sweep on the {len(datas)} test photos (one process):")
    for side in (480, 640, 800, 1024, 1280):
        for upsample in (0, 1):
            cfg = config.model_copy(update={"detect_max_side": side, "upsample": upsample})
            model = load_model(cfg)
            started = time.perf_counter()
            results = [analyze_bytes(d, model, DecodeConfig()) for d in datas]
            seconds = time.perf_counter() - started
            missed = sum(r.n_faces == 0 for r in results)
            found = sum(r.n_faces for r in results)
            print(
                f"  max side {side:5d} upsample {upsample}: {missed:2d} photos without a face, "
                f"{found:3d} faces, {len(datas) / seconds:5.2f} images/s"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=5, help="copies of each photo (at least 1)")
    parser.add_argument("--naive", type=int, default=24, help="images for the slow naive loop")
    parser.add_argument("--sweep", action="store_true", help="also sweep detection sizes")
    parser.add_argument(
        "--isolation",
        action="store_true",
        help="only compare the engine with isolated decoding (the default) and without, alternately",
    )
    args = parser.parse_args()
    if args.copies < 1:
        parser.error("--copies must be at least 1")
    config = ModelConfig()
    folder = replicate(args.copies)
    paths = sorted(folder.glob("*.jpg"))
    print(
        f"{len(paths)} images in {folder}, {os.cpu_count()} cores, "
        f"model {config.backend}/{config.detector}, "
        f"detect_max_side {config.detect_max_side}"
    )

    if args.isolation:
        compare_isolation(folder)
        return
    engine = run_engine(folder)
    careful = careful_loop(paths, config)
    naive_paths = paths[:: max(1, len(paths) // args.naive)][: args.naive]
    naive = naive_loop(naive_paths)
    rows = [
        ("engine (local, default)", engine),
        ("(a) careful single loop", careful),
        (f"(b) naive loop ({len(naive_paths)} images)", naive),
    ]
    print(f"\n{'':34s} {'images':>7s} {'faces':>6s} {'seconds':>8s} {'images/s':>9s} {'faces/s':>8s}")
    for name, (n, f, s) in rows:
        ips, fps = rate(n, f, s)
        print(f"{name:34s} {n:7d} {f:6d} {s:8.1f} {ips:9.2f} {fps:8.2f}")
    engine_ips = rate(*engine)[0]
    ratio_a, ratio_b = engine_ips / rate(*careful)[0], engine_ips / rate(*naive)[0]
    print(f"\nengine / (a): {ratio_a:.2f}x   engine / (b): {ratio_b:.2f}x")
    print("\nbare models over pre-decoded images (one process, first 64 images):")
    for name, value in bare_models(paths[:64], config).items():
        print(f"  {name:20s} {value * 1000:8.1f} ms")
    if args.sweep:
        sweep(config)


if __name__ == "__main__":
    main()
