"""Index benchmark: faceaudit's build against exact search and autofaiss, at the same RAM budget.

One command prints, per dim: build time, peak memory, RAM bytes per vector, recall@1 and @10 and
queries/s at the default nprobe, for exact search (faiss IndexFlatIP), faceaudit and autofaiss
(in its own virtual environment, .bench/autofaiss-venv, created on first use). Vectors are
clustered unit vectors (indexing.synthetic.clustered); queries are fresh points from the same
clusters; recall@k is the share of the exact top-k (inner product) found in the top k. Every
system runs in its own child process so that its peak memory is its own.

    .venv/bin/python bench/index.py --n 1000000 --dims 128 512          # the issue's scale
    .venv/bin/python bench/index.py --n 200000 --dims 128 --no-autofaiss # quicker
    .venv/bin/python bench/index.py --gpu ...   # GPU mode (NOT YET RUN: see docs/indexing.md)

GPU mode: checks nvidia-smi and whether the installed faiss sees a GPU (install the
faiss-gpu-cu12 wheel first, e.g. `pip install /path/to/faiss_gpu_cu12-*.whl`; its CUDA runtime
must match the driver). Without one it says why and reports CPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
AUTOFAISS_VENV = REPO / ".bench" / "autofaiss-venv"
AUTOFAISS_PINS = ["autofaiss==2.18.0", "faiss-cpu==1.8.0", "numpy<2", "pyarrow<17", "packaging"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the collection")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 512], help="dims to run")
    p.add_argument(
        "--bytes-per-vector", type=int, default=80, help="RAM budget per vector (80 = 80 MB at 1M)"
    )
    p.add_argument("--queries", type=int, default=1000, help="fresh queries")
    p.add_argument("--autofaiss", action=argparse.BooleanOptionalAction, default=True, help="run autofaiss")
    p.add_argument("--reuse-data", action="store_true", help="keep the generated data of an earlier run")
    p.add_argument("--gpu", action="store_true", help="build on the GPU (faiss GPU build needed)")
    p.add_argument("--work", default=str(REPO / ".bench" / "index"), help="scratch folder (deleted first)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.gpu:
        gpu_check()
    rows = []
    for dim in args.dims:
        rows += run_dim(args, dim)
    print_table(rows, args)


def run_dim(args, dim: int) -> list[dict]:
    work = Path(args.work) / f"d{dim}"
    if not (args.reuse_data and (work / "queries.npy").exists()):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        make_data(work, args.n, dim, args.queries)
    shutil.rmtree(work / "index", ignore_errors=True)
    rows = [exact(work, dim)]
    rows.append(spawn(args, "ours", work, dim))
    if args.autofaiss:
        rows.append(run_autofaiss(args, work, dim))
    return rows


def make_data(work: Path, n: int, dim: int, n_queries: int) -> None:
    from indexing import synthetic

    chunks = synthetic.clustered(n + n_queries, dim, clusters=max(1000, n // 1000), seed=dim, chunk=100_000)
    x = np.concatenate(list(chunks))
    base, queries = x[:n], x[n:]
    (work / "npy").mkdir()
    for i, part in enumerate(np.array_split(base, max(1, n // 100_000))):
        np.save(work / "npy" / f"part-{i:04d}.npy", part)
    np.save(work / "queries.npy", queries)
    synthetic.write_run(str(work / "runs"), "bench", iter(np.array_split(base, max(1, n // 100_000))), dim)


def exact(work: Path, dim: int) -> dict:
    import faiss

    base = np.concatenate([np.load(f) for f in sorted((work / "npy").glob("*.npy"))])
    queries = np.load(work / "queries.npy")
    t = time.perf_counter()
    index = faiss.IndexFlatIP(dim)
    index.add(base)
    built = time.perf_counter() - t
    t = time.perf_counter()
    _, truth = index.search(queries, 10)
    qps = len(queries) / (time.perf_counter() - t)
    np.save(work / "truth.npy", truth)
    return {
        "dim": dim,
        "system": "exact (IndexFlatIP)",
        "build_s": built,
        "peak_mb": None,
        "ram_bytes_per_vector": 4 * dim,
        "recall_at_1": 1.0,
        "recall_at_10": 1.0,
        "qps": qps,
        "index": "Flat",
    }


def spawn(args, what: str, work: Path, dim: int, python: str = sys.executable) -> dict:
    cmd = [
        python,
        __file__,
        "--child",
        what,
        "--work",
        str(work),
        "--dims",
        str(dim),
        "--bytes-per-vector",
        str(args.bytes_per_vector),
    ] + (["--gpu"] if args.gpu else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(args) -> None:
    work, dim = Path(args.work), args.dims[0]
    row = {"ours": child_ours}[args.child](args, work, dim)
    print(json.dumps(row))


def child_ours(args, work: Path, dim: int) -> dict:
    from indexing import BuildOptions, build_index, open_index

    t = time.perf_counter()
    result = build_index(
        [str(work / "runs")],
        str(work / "index"),
        BuildOptions(max_bytes_per_vector=args.bytes_per_vector, use_gpu=True if args.gpu else None),
    )
    built = time.perf_counter() - t
    peak = rss("VmHWM") / 2**20  # not ru_maxrss: that keeps the parent's peak across fork and exec
    queries = np.load(work / "queries.npy")
    anon0 = rss("RssAnon")
    index = open_index(str(work / "index"))
    index.search_ids(queries[:10], 10)  # warm up
    t = time.perf_counter()
    _, found = index.search_ids(queries, 10)
    qps = len(queries) / (time.perf_counter() - t)
    keys = key_order(work)
    m = result.manifest
    n = m["counts"]["faces"]
    index_bytes = sum(s["index"]["bytes"] for s in m["shards"])
    mapped = sum(s["ids"]["bytes"] + (s.get("vectors") or {}).get("bytes", 0) for s in m["shards"])
    return {
        "dim": dim,
        "system": "faceaudit",
        "build_s": built,
        "peak_mb": peak,
        "ram_bytes_per_vector": index_bytes / n,
        "mapped_bytes_per_vector": mapped / n,
        "rss_anon_bytes_per_vector": (rss("RssAnon") - anon0) / n,
        **recalls(found, keys, work),
        "qps": qps,
        "index": f"{m['factory']} nprobe {m['nprobe']} re-rank x{m['rerank_factor']}",
        "build_recall_at_10": m["recall"]["at_10"],
        "gpu": m["built_on_gpu"],
    }


def key_order(work: Path) -> np.ndarray:
    """face_id of each base vector, in generation order (to map exact-search rows to ids)."""
    from indexing import synthetic

    n = sum(np.load(f, mmap_mode="r").shape[0] for f in (work / "npy").glob("*.npy"))
    return np.array([synthetic.face_id(synthetic.image_sha(i), synthetic.MODEL_ID, 0) for i in range(n)])


def recalls(found_ids: np.ndarray, keys: np.ndarray | None, work: Path) -> dict:
    truth = np.load(work / "truth.npy")
    if keys is not None:
        truth = keys[truth]
    r10 = np.mean([len(np.intersect1d(f[:10], t[:10])) / 10 for f, t in zip(found_ids, truth, strict=True)])
    r1 = np.mean(found_ids[:, 0] == truth[:, 0])
    return {"recall_at_1": float(r1), "recall_at_10": float(r10)}


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


AUTOFAISS_CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np, faiss
from autofaiss import build_index
work, budget, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
index, infos = build_index(str(work / "npy"), index_path=str(work / "autofaiss.index"),
    index_infos_path=str(work / "autofaiss.json"), max_index_memory_usage=f"{budget * n // 1_000_000}MB",
    current_memory_available="16G", metric_type="ip", nb_cores=2, verbose=30)
built = time.perf_counter() - t
peak = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines()
            if l.startswith("VmHWM:")) / 1024  # not ru_maxrss, which keeps the parent's peak
if infos.get("index_param"):
    faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
queries = np.load(work / "queries.npy")
index.search(queries[:10], 10)
t = time.perf_counter()
_, found = index.search(queries, 10)
qps = len(queries) / (time.perf_counter() - t)
np.save(work / "autofaiss_found.npy", found)
size = (work / "autofaiss.index").stat().st_size
print(json.dumps({"build_s": built, "peak_mb": peak, "qps": qps, "ram_bytes_per_vector": size / n,
                  "index": f"{infos.get('index_key')} {infos.get('index_param')}"}))
"""


def run_autofaiss(args, work: Path, dim: int) -> dict:
    python = AUTOFAISS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(AUTOFAISS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *AUTOFAISS_PINS], check=True)
    script = work / "autofaiss_child.py"
    script.write_text(AUTOFAISS_CHILD)
    out = subprocess.run(
        [str(python), str(script), str(work), str(args.bytes_per_vector), str(args.n)],
        check=True,
        capture_output=True,
        text=True,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    found = np.load(work / "autofaiss_found.npy")
    return {"dim": dim, "system": "autofaiss 2.18", **row, **recalls(found, None, work)}


def gpu_check() -> None:
    smi = shutil.which("nvidia-smi")
    report = subprocess.run([smi], capture_output=True, text=True).stdout[:400] if smi else "absent"
    print("nvidia-smi:", report)
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    print(f"faiss {faiss.__version__}: {'GPU build, ' + str(gpus) + ' GPU(s)' if gpus else 'no GPU usable'}")
    if not gpus:
        print("falling back to CPU figures")


def print_table(rows: list[dict], args) -> None:
    print(
        f"\nn={args.n}, budget {args.bytes_per_vector} B/vector, {args.queries} fresh queries, "
        f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    head = [
        "dim",
        "system",
        "build_s",
        "peak_mb",
        "ram_bytes_per_vector",
        "recall_at_1",
        "recall_at_10",
        "qps",
        "index",
    ]
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(fmt(r.get(h)) for h in head))
    for dim in args.dims:
        by = {r["system"].split()[0]: r for r in rows if r["dim"] == dim}
        ours, auto = by.get("faceaudit"), by.get("autofaiss")
        if ours and auto:
            print(
                f"dim {dim}: faceaudit/autofaiss build time {ours['build_s'] / auto['build_s']:.2f}, "
                f"queries/s {ours['qps'] / auto['qps']:.2f}, recall@10 {ours['recall_at_10']:.3f} vs "
                f"{auto['recall_at_10']:.3f}"
            )
        if ours:
            print(
                f"dim {dim}: faceaudit vs exact queries/s {ours['qps'] / by['exact']['qps']:.2f}; "
                f"float16 store and ids mapped from disk: {ours['mapped_bytes_per_vector']:.0f} B/vector"
            )
    print(json.dumps(rows))


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.0f}"
    return "-" if v is None else str(v)


if __name__ == "__main__":
    main()
