"""Load on the look-up service: ``faceaudit serve`` on 127.0.0.1 over a synthetic index.

    python bench/serve.py [--faces 1000000] [--work /tmp/faceaudit-bench-serve]

The index holds ``--faces`` synthetic faces (indexing/synthetic.py: clustered unit vectors, one
face per image) in dlib's 128 dimensions under dlib's model id, so that real photos, embedded by
the real model, are searched in it. Its range tables hold every image's and source URL's hash.
Then, for the range look-up and for photo search (tests/data/faces photos), at concurrency 1, 8
and 32: requests/s, p50 and p99 latency, and errors (anything but 200). A bounded number of
requests per level. The baseline is ``faceaudit search`` on the same index and photos, run as a
command (photos/s over its wall time, model load and index open included, and without them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "data" / "faces"


def build(work: Path, n: int) -> tuple[Path, float]:
    """The synthetic index (reused when ``work`` already holds one of ``n`` faces)."""
    from indexing import BuildOptions, build_index, synthetic
    from pipelines.core.config import ModelConfig
    from pipelines.core.models import load_model

    index = work / "index"
    stamp = work / "built.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("faces") == n:
        return index, json.loads(stamp.read_text())["seconds"]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = ModelConfig()
    model = load_model(config)
    started = time.perf_counter()
    chunks = synthetic.clustered(n, 128, clusters=max(1000, n // 1000), seed=7, chunk=100_000)
    run = synthetic.write_run(
        str(work / "runs"),
        "bench",
        chunks,
        128,
        model_id=model.model_id,
        match_threshold=model.match_threshold,
    )
    manifest_path = Path(run) / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"] = config.model_dump(mode="json")  # photos are embedded by the real model
    manifest_path.write_text(json.dumps(manifest, indent=2))
    build_index([run], str(index), BuildOptions())
    seconds = time.perf_counter() - started
    stamp.write_text(json.dumps({"faces": n, "seconds": round(seconds, 1)}))
    return index, round(seconds, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(index: Path, work: Path, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = work / "serve.yaml"
    config.write_text(
        f"workers: {workers}\nqueue: 64\nsearch_per_hour: 1000000\nrange_per_minute: 1000000\n"
        "requests_per_hour: 1000000\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines",
            "serve",
            "--index",
            str(index),
            "--port",
            str(port),
            "--config",
            str(config),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "serve.log", "w"),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the service exited: see {work / 'serve.log'}")
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the service was not ready within 300 s")


def load(call, total: int, concurrency: int) -> dict:
    """``total`` calls of ``call(i) -> status`` on ``concurrency`` threads (a session each)."""
    latencies: list[float] = []
    errors = 0

    def one(i: int) -> tuple[float, int]:
        started = time.perf_counter()
        status = call(i)
        return time.perf_counter() - started, status

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for seconds, status in pool.map(one, range(total)):
            latencies.append(seconds)
            errors += status != 200
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": total,
        "rps": round(total / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "errors": errors,
    }


def cli_baseline(index: Path, photos: list[Path]) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "search", "--index", str(index), "--json", *map(str, photos)],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    wall = time.perf_counter() - started
    found = json.loads(done.stdout)
    one = subprocess.run(
        [sys.executable, "-m", "pipelines", "search", "--index", str(index), "--json", str(photos[0])],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    del one
    single = time.perf_counter() - started - wall
    per_photo = (wall - single) / max(len(photos) - 1, 1)
    return {
        "photos": len(found["photos"]),
        "wall_s": round(wall, 1),
        "photos_per_s": round(len(photos) / wall, 2),
        "photos_per_s_after_startup": round(1 / per_photo, 2) if per_photo > 0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/faceaudit-bench-serve"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--range-requests", type=int, default=2000, help="range look-ups per level")
    parser.add_argument("--photo-requests", type=int, default=48, help="photo searches per level")
    args = parser.parse_args()

    index, build_s = build(args.work, args.faces)
    photos = sorted(FACES.glob("img*.jpg"))[:32]
    blobs = [p.read_bytes() for p in photos]
    prefixes = [hashlib.sha256(str(i).encode()).hexdigest()[:5] for i in range(args.range_requests)]
    proc, base = start_service(index, args.work, args.workers)
    report: dict = {"faces": args.faces, "build_s": build_s, "workers": args.workers, "cpus": os.cpu_count()}
    try:
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=64, pool_maxsize=64)
        session.mount("http://", adapter)

        def range_call(i: int) -> int:
            return session.get(
                f"{base}/v1/source/range/{prefixes[i % len(prefixes)]}", timeout=60
            ).status_code

        def photo_call(i: int) -> int:
            files = {"photo": ("p.jpg", blobs[i % len(blobs)], "image/jpeg")}
            return session.post(
                f"{base}/v1/search", data={"consent": "yes"}, files=files, timeout=300
            ).status_code

        for call, total in ((range_call, 50), (photo_call, 4)):  # warm-up
            load(call, total, 1)
        report["range"] = [load(range_call, args.range_requests, c) for c in (1, 8, 32)]
        report["photo"] = [load(photo_call, args.photo_requests, c) for c in (1, 8, 32)]
    finally:
        proc.terminate()
        proc.wait(30)
    report["cli_search"] = cli_baseline(index, photos[:16])
    print(json.dumps(report, indent=2))
    print(
        f"\nlook-up service on a synthetic index of {args.faces:,} faces ({os.cpu_count()} CPUs, "
        f"{args.workers} search workers; build {build_s} s)"
    )
    print("| endpoint | concurrency | requests | req/s | p50 ms | p99 ms | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ("range", "photo"):
        for r in report[name]:
            print(
                f"| {name} | {r['concurrency']} | {r['requests']} | {r['rps']} | {r['p50_ms']} | "
                f"{r['p99_ms']} | {r['errors']} |"
            )
    c = report["cli_search"]
    print(
        f"\nbaseline `faceaudit search` on the same index: {c['photos']} photos in {c['wall_s']} s = "
        f"{c['photos_per_s']} photos/s ({c['photos_per_s_after_startup']} photos/s after start-up)"
    )


if __name__ == "__main__":
    main()
