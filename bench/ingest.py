"""Ingest throughput on the test photos, against baselines run in the same command.

    .venv/bin/python bench/ingest.py [--copies 5] [--naive 24] [--sweep] [--isolation]

The test photos (tests/data/faces, or the folder in $FACEAUDIT_FACES) are replicated (re-encoded,
so every copy is new bytes) to --copies x 64 images in .bench/ingest-photos-<copies>. Printed, as
images/s, faces/s and ratios:

* engine: the local engine with its default settings (all cores; dlib's networks on ONNX Runtime);
* (a) careful loop: one process, the same models and settings (decode, downscale for detection,
  landmarks and descriptor at full resolution), one image after another, with dlib running its
  own networks (``model.runtime: dlib``), the best a dlib user gets without this project;
* (a') the same loop on the default ``onnx`` runtime, one image at a time;
* (b) naive loop: what face_recognition users write: load at full resolution, HOG with one
  upsample, 5-point landmarks, descriptor; run on the first --naive images only (it is slow);
* pair accuracy of the engine's and (a)'s embeddings at the shipped threshold (both label files);
* bare models: each part alone over pre-decoded images, to show where time goes, and the PDQ hash's
  cost per image as a share of the one-process time per image of (a');
* the load average before and after: the engine uses every core and the loops one, so other work
  on the machine lowers the engine's ratio to them.

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
from tests.helpers import largest_face_embeddings  # noqa: E402


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


def run_engine_out(folder: Path) -> tuple[tuple[int, int, float], Path]:
    from pipelines.engines.local_engine import run_job

    out = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    job = JobConfig(datasets=[DatasetSpec(name="bench", source=str(folder))], out=str(out), progress=False)
    started = time.perf_counter()
    summary = run_job(job)
    seconds = time.perf_counter() - started
    counts = summary.manifest["counts"]
    return (counts["images"], counts["faces"], seconds), Path(summary.uri)


def careful_loop(paths: list[Path], config: ModelConfig) -> tuple[tuple[int, int, float], dict]:
    """The loop's counts and time, and each file's largest-face embedding."""
    model = load_model(config)
    decode = DecodeConfig()
    largest: dict[str, np.ndarray] = {}
    faces = 0
    started = time.perf_counter()
    for p in paths:
        result = analyze_bytes(p.read_bytes(), model, decode)
        faces += result.n_faces
        if result.faces:
            area = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in result.faces]
            largest[p.name] = result.faces[int(np.argmax(area))].embedding
    return (len(paths), faces, time.perf_counter() - started), largest


def pair_accuracy(embeddings: dict[str, np.ndarray], copy: int = 0) -> dict[str, float]:
    """Accuracy at the shipped threshold on each label file, over the copies ``-<copy>`` of the
    photos (the bench's replicas are named <stem>-<k>.jpg)."""
    import calibrate  # bench/calibrate.py, beside this script

    from pipelines.core.models.dlib_backend import DLIB_MATCH_THRESHOLD

    out = {}
    for name in calibrate.PAIRS:
        pairs = calibrate.load_pairs(photos.faces_dir() / name)
        keyed = [(f"{Path(x).stem}-{copy}.jpg", f"{Path(y).stem}-{copy}.jpg", same) for x, y, same in pairs]
        keyed = [(x, y, same) for x, y, same in keyed if x in embeddings and y in embeddings]
        sims = np.array([float(embeddings[x] @ embeddings[y]) for x, y, _ in keyed])
        same = np.array([s for _, _, s in keyed])
        out[name] = calibrate.rates(sims, same, DLIB_MATCH_THRESHOLD)[0]
    return out


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
    """Seconds per image (or face) of each part, over images decoded beforehand, one at a time."""
    from pipelines.core import pdq

    model = load_model(config)
    decoded = [decode_image(p.read_bytes(), DecodeConfig().max_pixels) for p in paths]
    timer = _Timer()
    with timer("decode s/image"):
        for path in paths:
            decode_image(path.read_bytes(), DecodeConfig().max_pixels)
    with timer("PDQ hash s/image"):
        for image in decoded:
            pdq.hash_pixels(image.pixels)
    with timer("downscale s/image"):
        for image in decoded:
            downscale(image, config.detect_max_side)
    with timer("detect s/image"):  # downscale included
        found = [model._detect(image) for image in decoded]  # noqa: SLF001 - timing the parts
    with timer("landmarks s/face"):
        shapes = [model._shapes(image, boxes) for image, (boxes, _) in zip(decoded, found, strict=True)]  # noqa: SLF001
    n_faces = max(1, sum(len(boxes) for boxes, _ in found))
    if config.runtime == "onnx":
        with timer("face chips s/face"):
            chips = [model._chips(image, s) for image, s in zip(decoded, shapes, strict=True)]  # noqa: SLF001
        with timer("descriptor s/face"):
            for image_chips in chips:
                model._nets.embed([image_chips])  # noqa: SLF001
    else:
        with timer("descriptor s/face"):  # chips included: dlib cuts them inside this call
            for image, image_shapes in zip(decoded, shapes, strict=True):
                model._encoder.compute_face_descriptor(image.pixels, image_shapes)  # noqa: SLF001
    n = len(paths)
    return {name: t / (n_faces if name.endswith("/face") else n) for name, t in timer.seconds.items()}


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.started = time.perf_counter()

            def __exit__(self, *_):
                timer.seconds[name] = time.perf_counter() - self.started

        return _Span()


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
    load = os.getloadavg()[0]  # the engine needs every core; other work on them costs it most
    engine, run_dir = run_engine_out(folder)
    careful, careful_emb = careful_loop(paths, config.model_copy(update={"runtime": "dlib"}))
    onnx_one, _ = careful_loop(paths, config)
    naive_paths = paths[:: max(1, len(paths) // args.naive)][: args.naive]
    naive = naive_loop(naive_paths)
    rows = [
        ("engine (local, default)", engine),
        ("(a) careful single loop, dlib", careful),
        ("(a') same loop, onnx runtime", onnx_one),
        (f"(b) naive loop ({len(naive_paths)} images)", naive),
    ]
    print(f"\n{'':34s} {'images':>7s} {'faces':>6s} {'seconds':>8s} {'images/s':>9s} {'faces/s':>8s}")
    for name, (n, f, s) in rows:
        ips, fps = rate(n, f, s)
        print(f"{name:34s} {n:7d} {f:6d} {s:8.1f} {ips:9.2f} {fps:8.2f}")
    engine_ips = rate(*engine)[0]
    ratio_a, ratio_b = engine_ips / rate(*careful)[0], engine_ips / rate(*naive)[0]
    ratio_one = rate(*onnx_one)[0] / rate(*careful)[0]
    print(f"\nengine / (a): {ratio_a:.2f}x   engine / (b): {ratio_b:.2f}x   (a') / (a): {ratio_one:.2f}x")
    engine_acc = pair_accuracy(largest_face_embeddings(run_dir))
    careful_acc = pair_accuracy(careful_emb)
    for name in engine_acc:
        print(f"pair accuracy on {name}: engine {engine_acc[name]:.4f}, (a) {careful_acc[name]:.4f}")
    print("\nbare models over pre-decoded images (one process, first 64 images):")
    for runtime in ("dlib", "onnx"):
        parts = bare_models(paths[:64], config.model_copy(update={"runtime": runtime}))
        print(f"  runtime {runtime}:")
        for name, value in parts.items():
            print(f"    {name:20s} {value * 1000:8.1f} ms")
    pdq_share = parts["PDQ hash s/image"] / (onnx_one[2] / onnx_one[0])
    print(
        f"PDQ hash: {parts['PDQ hash s/image'] * 1000:.1f} ms per image, "
        f"{pdq_share:.1%} of (a')'s time per image"
    )
    print(f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    if args.sweep:
        sweep(config)


if __name__ == "__main__":
    main()
