"""dlib's two networks on ONNX Runtime against dlib itself, on the CPU, in one command.

    .venv/bin/python bench/dlib_nets.py [--faces 64] [--images 12] [--side 512] [--threads 0]

* descriptor: ms per face of the 128-d ResNet on the face chips of the test photos (tests/data/faces,
  or $FACEAUDIT_FACES): dlib's ``compute_face_descriptor`` on one chip at a time and on all chips
  in one call (dlib batches them itself), against ONNX Runtime at batch 1 and at batch 32;
* MMOD: s per image of the CNN face detector on --images photos downscaled to --side px on the long
  side: ``dlib.cnn_face_detection_model_v1`` against ``dlib_mmod.MmodDetector`` (pyramid, tiling,
  decoding and NMS in numpy included), one image at a time.

Ratios are dlib's time over ONNX Runtime's, measured in the same command. Both sides also agree:
the largest descriptor difference and whether the boxes are equal are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import photos  # noqa: E402  (bench/photos.py, beside this script)
from photos import best_of  # noqa: E402

from pipelines.core.config import DecodeConfig, ModelConfig  # noqa: E402
from pipelines.core.decode import decode_image  # noqa: E402
from pipelines.core.models.dlib_backend import MMOD_FILE, RESNET_FILE, weight_file  # noqa: E402
from pipelines.core.models.dlib_onnx import graph_bytes, open_dlib_session, session_options  # noqa: E402
from pipelines.core.models.dlib_resnet_onnx import INPUT, build_resnet_graph  # noqa: E402


def face_chips(limit: int) -> np.ndarray:
    """Chips of the faces HOG finds on the test photos, as the backend cuts them."""
    from pipelines.core.models import load_model

    model = load_model(ModelConfig(runtime="dlib"))
    chips = []
    for path in sorted(photos.faces_dir().glob("*.jpg")):
        image = decode_image(path.read_bytes(), DecodeConfig().max_pixels)
        boxes, _ = model._detect(image)  # noqa: SLF001 - the backend's own steps
        if boxes:
            chips.append(model._chips(image, model._shapes(image, boxes)))  # noqa: SLF001
    return np.concatenate(chips)[:limit]


def descriptor(args, cache: Path) -> None:
    import dlib

    chips = face_chips(args.faces)
    n = len(chips)
    encoder = dlib.face_recognition_model_v1(weight_file(RESNET_FILE))
    graph = graph_bytes(weight_file(RESNET_FILE), "dlib_resnet_v1", build_resnet_graph, cache)
    session = open_dlib_session(graph, session_options(["cpu"], args.threads, cache))

    def ort(batch: int) -> np.ndarray:
        parts = [session.run(None, {INPUT: chips[i : i + batch]})[0] for i in range(0, n, batch)]
        return np.concatenate(parts)

    ort(32)  # warm-up: first runs allocate
    reference = np.array([encoder.compute_face_descriptor(chip) for chip in chips[:8]])
    times = {
        "dlib, one chip a call": best_of(1, lambda: [encoder.compute_face_descriptor(c) for c in chips]) / n,
        "dlib, all chips in one call": best_of(1, lambda: encoder.compute_face_descriptor(list(chips))) / n,
        "ONNX Runtime, batch 1": best_of(args.rounds, lambda: ort(1)) / n,
        "ONNX Runtime, batch 32": best_of(args.rounds, lambda: ort(32)) / n,
    }
    diff = float(np.abs(ort(32)[:8] - reference).max())
    print(f"\ndescriptor, {n} face chips (max abs difference to dlib {diff:.1e}):")
    base = times["dlib, one chip a call"]
    for name, seconds in times.items():
        print(f"  {name:30s} {seconds * 1000:8.2f} ms/face   dlib one-by-one / this: {base / seconds:6.1f}x")


def mmod(args, cache: Path) -> None:
    import dlib

    from pipelines.core.models import dlib_mmod

    paths = sorted(photos.faces_dir().glob("*.jpg"))[: args.images]
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        image.thumbnail((args.side, args.side))
        images.append(np.asarray(image))
    detector = dlib.cnn_face_detection_model_v1(weight_file(MMOD_FILE))
    graph = graph_bytes(weight_file(MMOD_FILE), "dlib_mmod", dlib_mmod.build_mmod_graph, cache)
    ours = dlib_mmod.MmodDetector(open_dlib_session(graph, session_options(["cpu"], args.threads, cache)))
    ours.detect(images[:1])  # warm-up
    theirs_found: list = []
    ours_found: list = []

    def run_dlib():
        theirs_found[:] = [
            [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()) for d in detector(im, 0)]
            for im in images
        ]

    def run_ours():
        ours_found[:] = [[f[:4] for f in ours.detect([im])[0]] for im in images]

    t_dlib = best_of(1, run_dlib) / len(images)
    t_ours = best_of(args.rounds, run_ours) / len(images)
    same = sorted(map(sorted, theirs_found)) == sorted(map(sorted, ours_found))
    print(f"\nMMOD, {len(images)} photos at most {args.side} px (boxes equal to dlib's: {same}):")
    print(f"  {'dlib':30s} {t_dlib:8.3f} s/image")
    print(f"  {'ONNX Runtime + numpy':30s} {t_ours:8.3f} s/image   dlib / this: {t_dlib / t_ours:6.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faces", type=int, default=64, help="face chips for the descriptor")
    parser.add_argument("--images", type=int, default=12, help="photos for MMOD")
    parser.add_argument("--side", type=int, default=512, help="MMOD: longest side of the photos")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    parser.add_argument("--rounds", type=int, default=3, help="ONNX Runtime timings (the best is kept)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before")
    with tempfile.TemporaryDirectory(prefix="bench-dlib-nets-") as cache:
        descriptor(args, Path(cache))
        mmod(args, Path(cache))
    print(f"\nload average {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
