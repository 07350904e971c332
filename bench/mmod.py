"""dlib's MMOD CNN face detector: ONNX Runtime (pipelines/core/models/dlib_mmod.py) against dlib, in
one command, on the photos of the parity test (every fifth test photo, 12 of them, downscaled to
--side on the long side).

    .venv/bin/python bench/mmod.py [--side 512] [--threads 2] [--repeat 3] [--providers cpu]

Printed: seconds per image for dlib.cnn_face_detection_model_v1 and for MmodDetector one image at
a time (best of --repeat passes over the photos, after one warm-up image), their ratio, the share of
the ONNX time spent in numpy (tiling the pyramid, decoding, NMS), and the batched throughput of
same-size images (the photos cropped to the smallest one's size) against one at a time. Every image's
boxes are checked against dlib's in the same run. --providers cuda measures the ONNX side on a GPU
(dlib stays on the CPU); a provider the session did not get is an error, not a silent CPU run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.core.decode import decode_image, downscale  # noqa: E402
from pipelines.core.models.dlib_backend import weight_file  # noqa: E402
from pipelines.core.models.dlib_dat import read_network  # noqa: E402
from pipelines.core.models.dlib_mmod import MmodDetector, build_mmod_graph, tile_pyramid  # noqa: E402

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def load_photos(side: int, count: int = 12) -> list[np.ndarray]:
    photos = sorted((REPO / "tests" / "data" / "faces").glob("*.jpg"))
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


def best_time(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the photos; the best counts")
    parser.add_argument("--providers", default="cpu", help="comma-separated: cpu, cuda")
    args = parser.parse_args()

    import dlib

    images = load_photos(args.side)
    cnn = dlib.cnn_face_detection_model_v1(weight_file("mmod_human_face_detector.dat"))
    sess = session(args.threads, args.providers.split(","))
    detector = MmodDetector(sess)
    detector.detect(images[:1])  # warm-up: ORT plans its first shapes

    found: dict[str, list] = {}
    t_dlib = best_time(lambda: found.__setitem__("dlib", [list(cnn(im, 0)) for im in images]), 1)
    t_onnx = best_time(
        lambda: found.__setitem__("onnx", [detector.detect([im])[0] for im in images]), args.repeat
    )
    t_tiles = best_time(lambda: [tile_pyramid(im[None], detector.spec) for im in images], args.repeat)
    ref = [
        [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()) for d in ds] for ds in found["dlib"]
    ]
    got = [[d[:4] for d in ds] for ds in found["onnx"]]
    scores = [abs(d.confidence - g[4]) for ds, gs in zip(found["dlib"], found["onnx"], strict=True)
              for d, g in zip(ds, gs, strict=False)]  # fmt: skip
    n = len(images)
    print(f"{n} photos at {args.side} px, {sum(map(len, ref))} faces; ONNX providers {sess.get_providers()}")
    print(f"  boxes identical to dlib's: {ref == got}; max score difference {max(scores, default=0):.1e}")
    print(f"  dlib.cnn_face_detection_model_v1   {t_dlib / n:.3f} s/image")
    print(f"  MmodDetector, one at a time        {t_onnx / n:.3f} s/image   {t_dlib / t_onnx:.1f}x dlib")
    print(f"    of which numpy pyramid tiling    {t_tiles / n:.3f} s/image   ({t_tiles / t_onnx:.0%})")

    rows, cols = min(im.shape[0] for im in images), min(im.shape[1] for im in images)
    crops = [np.ascontiguousarray(im[:rows, :cols]) for im in images]
    t_one = best_time(lambda: [detector.detect([im]) for im in crops], args.repeat)
    for batch in (4, 12):
        batched = MmodDetector(sess, max_batch=batch)
        t_batch = best_time(lambda b=batched: b.detect(crops), args.repeat)
        print(
            f"  {cols}x{rows} crops in batches of {batch:<2}        {t_batch / n:.3f} s/image   "
            f"{t_one / t_batch:.2f}x one at a time ({t_one / n:.3f} s/image)"
        )


if __name__ == "__main__":
    main()
