"""dlib's MMOD CNN face detector: ONNX Runtime (pipelines/core/models/dlib_mmod.py) against dlib, in
one command, on the photos of the parity test (every fifth test photo, 12 of them, downscaled to
--side on the long side).

    .venv/bin/python bench/mmod.py [--side 512] [--threads 2] [--repeat 3] [--providers cpu]

Printed: seconds per image for dlib.cnn_face_detection_model_v1 and for MmodDetector one image at
a time (one pass, the two interleaved image by image, after one warm-up image), their ratio, the
share of the ONNX side spent tiling the pyramid in numpy, and the batched throughput (best of
--repeat passes) of same-size images (the photos cropped to the smallest one's size) against one
at a time. Every image's boxes are checked against dlib's in the same run. --providers cuda
measures the ONNX side on a GPU (dlib stays on the CPU); a provider the session did not get is an
error, not a silent CPU run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.photos import best_of, faces_dir  # noqa: E402
from pipelines.core.decode import decode_image, downscale  # noqa: E402
from pipelines.core.models.dlib_backend import weight_file  # noqa: E402
from pipelines.core.models.dlib_dat import read_network  # noqa: E402
from pipelines.core.models.dlib_mmod import MmodDetector, build_mmod_graph, tile_pyramid  # noqa: E402

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def load_photos(side: int, count: int = 12) -> list[np.ndarray]:
    photos = sorted(faces_dir().glob("*.jpg"))
    chosen = photos[:: len(photos) // count][:count]
    return [
        np.ascontiguousarray(downscale(decode_image(p.read_bytes(), 100_000_000), side)[0]) for p in chosen
    ]


def session(threads: int, providers: list[str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    wanted = [PROVIDERS[p] for p in providers]
    model = build_mmod_graph(read_network(weight_file("mmod_human_face_detector.dat")))
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=wanted)
    if [p for p in wanted if p not in sess.get_providers()]:
        raise SystemExit(f"asked for {wanted}, the session got {sess.get_providers()}")
    return sess


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeat", type=int, default=3, help="batched passes; the best counts")
    parser.add_argument("--providers", default="cpu", help="comma-separated: cpu, cuda")
    args = parser.parse_args()

    import dlib

    images = load_photos(args.side)
    cnn = dlib.cnn_face_detection_model_v1(weight_file("mmod_human_face_detector.dat"))
    sess = session(args.threads, args.providers.split(","))
    detector = MmodDetector(sess)
    detector.detect(images[:1])  # warm-up: ORT plans its first shapes

    # interleaved, image by image, so that both sides run under the same load
    t_dlib = t_onnx = t_tiles = 0.0
    ref, got, scores = [], [], []
    for image in images:
        start = time.perf_counter()
        expected = list(cnn(image, 0))
        t_dlib += time.perf_counter() - start
        start = time.perf_counter()
        found = detector.detect([image])[0]
        t_onnx += time.perf_counter() - start
        start = time.perf_counter()
        tile_pyramid(image[None], detector.spec)
        t_tiles += time.perf_counter() - start
        ref.append([(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()) for d in expected])
        got.append([d[:4] for d in found])
        scores += [abs(d.confidence - g[4]) for d, g in zip(expected, found, strict=False)]
    n = len(images)
    print(f"{n} photos at {args.side} px, {sum(map(len, ref))} faces; ONNX providers {sess.get_providers()}")
    print(f"  boxes identical to dlib's: {ref == got}; max score difference {max(scores, default=0):.1e}")
    print(f"  dlib.cnn_face_detection_model_v1   {t_dlib / n:.3f} s/image")
    print(f"  MmodDetector, one at a time        {t_onnx / n:.3f} s/image   {t_dlib / t_onnx:.1f}x dlib")
    print(f"    of which numpy pyramid tiling    {t_tiles / n:.3f} s/image   ({t_tiles / t_onnx:.0%})")

    rows, cols = min(im.shape[0] for im in images), min(im.shape[1] for im in images)
    crops = [np.ascontiguousarray(im[:rows, :cols]) for im in images]
    t_one = best_of(args.repeat, lambda: [detector.detect([im]) for im in crops])
    for batch in (4, 12):
        batched = MmodDetector(sess, max_batch=batch)
        t_batch = best_of(args.repeat, lambda b=batched: b.detect(crops))
        print(
            f"  {cols}x{rows} crops in batches of {batch:<2}        {t_batch / n:.3f} s/image   "
            f"{t_one / t_batch:.2f}x one at a time ({t_one / n:.3f} s/image)"
        )


if __name__ == "__main__":
    main()
