"""Throughput of the Ray and Beam engines against the local engine, in one command, on one machine.

    .venv/bin/python bench/engines.py [--copies 5] [--cpus 2] [--images-per-shard 16] [--rounds 1]

The test photos (tests/data/faces, or the folder in $FACEAUDIT_FACES) are replicated (re-encoded,
so every copy is new bytes) to --copies x 64 images in .bench/engines-photos-<copies>. Each engine
runs the same job in a fresh process with --cpus worker CPUs (local: worker processes; Ray: a local
Ray with that many CPUs, one model actor per CPU; Beam: the DirectRunner with that many worker
processes) and prints images/s and its ratio to the local engine. Ray is also run with 1 actor on
the same Ray instance, for its scaling from 1 to --cpus worker CPUs. Times are wall clock from
run_job's start to the committed manifest (Ray's start-up, about 2 s, is not counted: a cluster is
up before a job is sent). Ray's workers run at nice 0 here, like the other engines' (Ray's default
is 15).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import photos  # noqa: E402  (bench/photos.py, beside this script)

from pipelines.core.config import DatasetSpec, JobConfig  # noqa: E402

WORK = REPO / ".bench" / "engines"


def replicate(copies: int) -> Path:
    return photos.replicate(copies, "engines")


def make_job(photos: Path, engine: str, args: argparse.Namespace, tag: str, **extra) -> JobConfig:
    out = WORK / tag
    shutil.rmtree(out, ignore_errors=True)
    return JobConfig(
        datasets=[DatasetSpec(name="bench", source=str(photos))],
        out=str(out),
        run_id="bench",
        engine=engine,
        images_per_shard=args.images_per_shard,
        workers=args.cpus,
        progress=False,
        **extra,
    )


MEASUREMENTS = ("local", "ray", "ray-1", "beam")  # ray-1: Ray with one actor, for the scaling
MARK = "@@"  # a child prints @@start and @@end around the run, so the parent can read CPU time


def child(args: argparse.Namespace) -> None:
    """One measurement in this process; prints its result as the last JSON line."""
    photos = replicate(args.copies)
    kind = args.child
    engine = kind.split("-")[0]
    if engine == "ray":
        import ray

        # Ray starts its workers at nice 15 (to keep its daemons responsive). The local engine's
        # and Beam's workers run at nice 0, so on a machine shared with other work Ray would get a
        # smaller share of the CPU for reasons that have nothing to do with the engine.
        os.environ["RAY_worker_niceness"] = "0"
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    actors = 1 if kind == "ray-1" else args.cpus
    job = make_job(photos, engine, args, kind, ray={"actors": actors})
    run, name = _runner(engine, job, args.cpus, actors)
    print(f"{MARK}start", flush=True)
    start = time.perf_counter()
    summary = run()
    seconds = time.perf_counter() - start
    print(f"{MARK}end", flush=True)
    counts = summary.manifest["counts"]
    print(
        json.dumps({"name": name, "images": counts["images"], "faces": counts["faces"], "seconds": seconds})
    )


def _runner(engine: str, job: JobConfig, cpus: int, actors: int):
    if engine == "local":
        from pipelines.engines import local_engine

        return (lambda: local_engine.run_job(job)), f"local, {cpus} workers"
    if engine == "ray":
        from pipelines.engines import ray_engine

        return (lambda: ray_engine.run_job(job)), f"ray, {actors} actor(s)"
    from pipelines.engines import beam_engine

    options = [
        "--runner=DirectRunner",
        "--direct_running_mode=multi_processing",
        f"--direct_num_workers={cpus}",
    ]
    return (lambda: beam_engine.run_job(job, options)), f"beam, DirectRunner x{cpus}"


def cpu_seconds(root: int) -> dict[int, float]:
    """user+system CPU seconds of ``root`` and every process below it, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    below, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            below[pid] = table[pid][1]
            todo += [p for p, (parent, _) in table.items() if parent == pid]
    return below


def measure(kind: str, args: argparse.Namespace) -> dict:
    """Run one measurement in a child; add the CPU seconds its process tree spent in the run."""
    cmd = [sys.executable, __file__, "--child", kind, "--copies", str(args.copies)]
    cmd += ["--cpus", str(args.cpus), "--images-per-shard", str(args.images_per_shard)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    seen: dict[int, float] = {}
    at_start: dict[int, float] = {}
    lines = []
    assert proc.stdout is not None
    sampler = _Sampler(proc.pid, seen)
    sampler.start()
    for line in proc.stdout:
        if line.startswith(f"{MARK}start"):
            at_start = dict(seen) | cpu_seconds(proc.pid)
        elif line.startswith(f"{MARK}end"):
            seen.update(cpu_seconds(proc.pid))
            sampler.stop()
        lines.append(line)
    if proc.wait() != 0:
        raise SystemExit(f"{kind} failed; run bench/engines.py --child {kind} to see why")
    result = json.loads(lines[-1])
    result["cpu_seconds"] = sum(cpu - at_start.get(pid, 0.0) for pid, cpu in seen.items())
    return result


class _Sampler(threading.Thread):
    """Keeps the last CPU time seen of every process under ``root`` (short-lived ones included)."""

    def __init__(self, root: int, seen: dict[int, float]):
        super().__init__(daemon=True)
        self.root, self.seen, self.running = root, seen, True

    def run(self) -> None:
        while self.running:
            self.seen.update(cpu_seconds(self.root))
            time.sleep(0.25)

    def stop(self) -> None:
        self.running = False
        self.join()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=5, help="copies of each photo (at least 1)")
    parser.add_argument("--cpus", type=int, default=2, help="worker CPUs of every engine")
    parser.add_argument("--images-per-shard", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every engine; the best is kept")
    parser.add_argument("--child", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.copies < 1:
        parser.error("--copies must be at least 1")
    if args.child:
        child(args)
        return
    photos = replicate(args.copies)  # exits (status 2) when there are no photos
    n = len(list(photos.glob("*.jpg")))
    originals = n // args.copies
    print(f"{n} images ({args.copies} re-encoded copies of {originals} photos), {args.cpus} worker CPUs,")
    print(f"{args.images_per_shard} images per unit; this machine has {os.cpu_count()} cores\n")
    load = os.getloadavg()[0]
    # Rounds alternate the engines, so a burst of load from elsewhere hits them all alike.
    rounds = [[measure(kind, args) for kind in MEASUREMENTS] for _ in range(args.rounds)]
    rows = [min(same, key=lambda r: r["seconds"]) for same in zip(*rounds, strict=True)]
    local = rows[0]["images"] / rows[0]["seconds"]
    local_cpu = rows[0]["cpu_seconds"] / rows[0]["images"]
    columns = ("images", 7), ("faces", 6), ("seconds", 8), ("images/s", 9), ("x local", 8), ("CPU s/img", 10)
    header = " ".join(f"{name:>{width}}" for name, width in (*columns, ("x local", 8)))
    print(f"{'engine':28} {header}")
    for r in rows:
        speed, cpu = r["images"] / r["seconds"], r["cpu_seconds"] / r["images"]
        figures = f"{r['images']:7d} {r['faces']:6d} {r['seconds']:8.1f} {speed:9.2f} {speed / local:8.2f}"
        print(f"{r['name']:28} {figures} {cpu:10.3f} {cpu / local_cpu:8.2f}")
    one, many = (rows[2]["images"] / rows[2]["seconds"]), (rows[1]["images"] / rows[1]["seconds"])
    print(f"\nRay scaling, 1 -> {args.cpus} actors: {many / one:.2f}x")
    print(f"best of {args.rounds} round(s); load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("CPU s/img: CPU seconds of the engine's processes (workers, daemons) per image, in the run")
    # Every engine must write what the local engine writes: a throughput figure over other output
    # is no figure (this check found Beam losing images on its multi-processing DirectRunner).
    wrong = [
        f"{r['name']}: {r['images']} images, {r['faces']} faces"
        for rnd in rounds
        for r in rnd
        if (r["images"], r["faces"]) != (n, rows[0]["faces"])
    ]
    if wrong:
        expected = f"{n} images, {rows[0]['faces']} faces"
        print(f"\nOUTPUT DIFFERS from the local engine's ({expected}): " + "; ".join(wrong))
        sys.exit(1)


if __name__ == "__main__":
    main()
