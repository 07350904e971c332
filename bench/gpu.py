"""GPU throughput of the insightface backend (detection, alignment, embedding) and of dlib's two
networks on ONNX Runtime (the default dlib backend: descriptor and MMOD detector), per runtime and batch.

NOT YET RUN ON A GPU. It was written and dry-run (--dry-run, CPU only) in sessions without one;
no figure in the docs comes from it yet. The device call is ``bash bench/gpu_call.sh`` (it says what
to carry; docs/dlib-onnx.md, "On a lent GPU"); ``PYTHON=<a venv with torch> bash bench/gpu_call.sh
--dry-run`` runs the same path here.

    python bench/gpu.py [--pack DIR] [--photos DIR] [--max-side 0] [--seconds 4] [--budget 420]
                        [--det-batches 16,32,64] [--embed-batches 64,128,256] [--out .bench/gpu.json]
                        [--wheels DIR] [--dlib-dat DIR] [--dlib-batches 1,32,128,512]
                        [--dlib-det-batches 1,8,16] [--no-dlib] [--no-insightface] [--dry-run]

Made to run in one call on a lent GPU machine (no internet, at most 64 MiB carried, PyTorch with
CUDA, onnx, and an onnxruntime that may be CPU-only) in under 8 minutes (--budget, seconds, stops
starting new measurements in time):

* Graphs: the real pack's det/rec .onnx when --pack is given, else SCRFD-10G- and
  IResNet-50-shaped networks with random weights, built here in PyTorch (their multiply-adds per
  image are counted and printed) and exported to ONNX.
* Runtimes: onnxruntime's TensorRT (fp16) and CUDA providers when this onnxruntime has them; if it
  has neither, the same networks run in PyTorch on CUDA (fp16), plugged into our own detector and
  embedder through the same ``run(uint8 NHWC batch)`` interface. Every row names its runtime.
* Figures: images/s of end-to-end analysis (letterbox, detection, decoding, NMS, up to 2 faces per
  image aligned and embedded) per batch size; faces/s of embedding alone; each against a bare loop
  of the same session or network on a pre-made batch (the ratio shows what our Python costs);
  mean GPU utilisation from nvidia-smi while each ran.
* CPU side with all cores (decode, letterbox, alignment): the likely ceiling per GPU.

dlib's networks (--dlib-dat DIR holding dlib_face_recognition_resnet_model_v1.dat and
mmod_human_face_detector.dat, 23 MB together, when face-recognition-models is not installed; copy
them into an ignored folder such as .bench/dlib-dat and carry it): their ONNX graphs are built here
from the .dat files, then the descriptor (random chips, faces/s per batch in --dlib-batches) and
MMOD (test photos on 512x512 canvases, images/s per batch in --dlib-det-batches) run on ONNX
Runtime's TensorRT and CUDA providers when this onnxruntime has them (float32: TF32 and fp16 off,
as the backend runs them), else the same graphs run op by op in PyTorch on CUDA in float32 with
TF32 off (bench/gpu_nets.TorchGraph), and once more in bfloat16 (torch-*-bf16 rows: what bf16
would gain, and how far it moves descriptors and boxes); each row gives the largest difference
to the CPU reference (ONNX Runtime on the CPU, else PyTorch on the CPU), which must stay under
1e-5 for the descriptors to share an index with dlib's. The descriptor's parity is checked on the faces the
reference's MMOD finds in the photos (cropped and resized to chips; dlib's aligned chips need dlib,
which the lent machine lacks) and 8 random chips, the timing on random chips; MMOD's rows come with
a bare row (the network alone on tiles made beforehand). --dry-run runs all of it on the CPU, the
PyTorch path included (torch-cpu-fp32 rows, where torch is installed), so that graph building,
TorchGraph, the parity check and the report are exercised without a GPU. What cannot run (no
onnxruntime-gpu, no faiss, a missing module) is said in a note, and skipped; the report is written.

--wheels DIR first installs missing pure-Python dependencies (pydantic, pyyaml, fsspec,
opencv-python-headless, onnx2torch, ...) from wheels carried in DIR, with pip --no-index.
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# bench/gpu_nets.py, beside this script
from gpu_nets import TorchRunner, count_gmacs, export_onnx, face_crops, torch_networks  # noqa: E402

PHOTOS = REPO / "tests" / "data" / "faces"  # the project's own test photos; --photos overrides
NEEDED = ("numpy", "cv2", "PIL", "pydantic", "yaml", "fsspec", "onnx", "onnxruntime")


# --- setup -----------------------------------------------------------------------------------


def preflight(wheels: str | None) -> list[str]:
    """Missing modules after installing what --wheels offers; the bench runs what it can without them."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing and wheels:
        names = {"cv2": "opencv-python-headless", "PIL": "pillow", "yaml": "pyyaml"}
        packages = [names.get(m, m) for m in missing] + ["onnx2torch"]
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, *packages]
        subprocess.run(cmd, check=False)
        importlib.invalidate_caches()
        missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    return missing


def environment() -> dict:
    info: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }
    info["cpus"] = os.cpu_count()
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        info["device"] = (
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
        )
    except ImportError:
        info["torch"] = None
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["ort_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
        info["ort_providers"] = []
    return info


# --- measuring -------------------------------------------------------------------------------


class GpuSampler:
    """Mean GPU utilisation (%) from nvidia-smi while a block runs; None without nvidia-smi."""

    def __init__(self):
        self.values: list[float] = []
        self.proc = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            cmd = [
                "nvidia-smi",
                "--query-gpu=utilization.gpu",
                "--format=csv,noheader,nounits",
                "-lms",
                "200",
            ]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.values.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.values)), 1) if self.values else None


@dataclass
class Row:
    runtime: str  # ort-tensorrt-fp16, ort-cuda, ort-cpu, torch-cuda-fp16, ...
    stage: str  # end-to-end, detect-bare, embed, embed-bare, cpu-side
    batch: int
    images_s: float | None = None
    faces_s: float | None = None
    ratio_to_bare: float | None = None
    gpu_util: float | None = None
    note: str = ""


@dataclass
class Clock:
    """The time budget: measurements that would not finish in it are skipped, and say so."""

    budget: float
    seconds: float
    start: float = field(default_factory=time.monotonic)

    def allows(self, factor: float = 1.5) -> bool:
        return time.monotonic() - self.start + self.seconds * factor < self.budget


def timed(fn, seconds: float, sync=None) -> tuple[int, float, float | None]:
    """(calls, elapsed, GPU utilisation) of calling ``fn`` for about ``seconds``, after a warm-up call."""
    fn()
    if sync:
        sync()
    calls, start = 0, time.perf_counter()
    with GpuSampler() as gpu:
        while time.perf_counter() - start < seconds:
            fn()
            calls += 1
        if sync:
            sync()
    return calls, time.perf_counter() - start, gpu.mean


# --- the pipeline under test -----------------------------------------------------------------


def analyze(detector, embedder, images: list[np.ndarray], max_faces: int) -> int:
    """What InsightfaceModel.analyze does after decoding; returns the number of faces embedded."""
    from pipelines.core.models.insightface_align import align
    from pipelines.core.models.insightface_detect import Detections

    found = [
        Detections(d.boxes[:max_faces], d.scores[:max_faces], d.landmarks[:max_faces])
        for d in detector.detect(images)
    ]
    vectors = embedder.embed(align(images, [d.landmarks for d in found], embedder.size))
    return len(vectors)


def bench_pair(
    runtime: str, detector, embedder, bare_det, bare_embed, images, args, clock, sync=None
) -> list[Row]:
    """End-to-end and bare detection per batch size, embedding and bare embedding per batch size."""
    from pipelines.core.models.insightface_detect import letterbox

    rows = []
    for batch in args.det_batches:
        if not clock.allows(3):
            rows.append(Row(runtime, "end-to-end", batch, note="skipped: time budget"))
            continue
        chosen = [images[i % len(images)] for i in range(batch)]
        detector.batch_size = batch
        faces = analyze(detector, embedder, chosen, 2)
        calls, elapsed, util = timed(lambda c=chosen: analyze(detector, embedder, c, 2), args.seconds, sync)
        pixels, _ = letterbox(chosen, detector.in_w, detector.in_h)
        bare_calls, bare_elapsed, bare_util = timed(lambda p=pixels: bare_det(p), args.seconds, sync)
        e2e, bare = calls * batch / elapsed, bare_calls * batch / bare_elapsed
        rows.append(Row(runtime, "end-to-end", batch, e2e, calls * faces / elapsed, e2e / bare, util))
        rows.append(Row(runtime, "detect-bare", batch, bare, None, None, bare_util))
    crops_all = np.random.default_rng(0).integers(
        0, 256, (max(args.embed_batches), 112, 112, 3), dtype=np.uint8
    )
    for batch in args.embed_batches:
        if not clock.allows(3):
            rows.append(Row(runtime, "embed", batch, note="skipped: time budget"))
            continue
        crops = crops_all[:batch]
        embedder.batch_size = batch
        calls, elapsed, util = timed(lambda c=crops: embedder.embed(c), args.seconds, sync)
        bare_calls, bare_elapsed, bare_util = timed(lambda c=crops: bare_embed(c), args.seconds, sync)
        rate, bare = calls * batch / elapsed, bare_calls * batch / bare_elapsed
        rows.append(Row(runtime, "embed", batch, None, rate, rate / bare, util))
        rows.append(Row(runtime, "embed-bare", batch, None, bare, None, bare_util))
    return rows


def ort_rows(provider: str, det_path: Path, rec_path: Path, images, args, clock, work: Path) -> list[Row]:
    from pipelines.core.config import ModelConfig
    from pipelines.core.models.insightface_backend import build_detector, build_embedder
    from pipelines.core.models.onnx_session import PIXELS, SessionOptions

    providers = {"tensorrt": ["tensorrt", "cuda"], "cuda": ["cuda"], "cpu": ["cpu"]}[provider]
    options = SessionOptions(providers=providers, trt_cache=str(work / "trt"), fp16=True)
    config = ModelConfig(backend="insightface", det_batch_size=max(args.det_batches), min_face_size=0)
    detector = build_detector(det_path, options, config)
    embedder = build_embedder(rec_path, options, max(args.embed_batches))

    def bare(runner):
        return lambda pixels: runner.session.run(runner.output_names, {PIXELS: pixels})

    runtime = f"ort-{provider}" + ("-fp16" if provider == "tensorrt" else "")
    return bench_pair(
        runtime, detector, embedder, bare(detector.runner), bare(embedder.runner), images, args, clock
    )


def torch_rows(det_net, rec_net, device: str, images, args, clock, converted: bool = False) -> list[Row]:
    from pipelines.core.models.insightface_align import ArcFaceEmbedder
    from pipelines.core.models.insightface_detect import ScrfdDetector

    fp16 = device.startswith("cuda")
    det_runner = TorchRunner(det_net, device, 127.5, 128.0, fp16, per_image=converted)
    rec_runner = TorchRunner(rec_net, device, 127.5, 127.5, fp16)
    detector = ScrfdDetector(det_runner, 9, (640, 640), 0.5, 0.4, max(args.det_batches))
    embedder = ArcFaceEmbedder(rec_runner, dim=512, batch_size=max(args.embed_batches))

    def bare(runner):  # the network alone on a batch already on the device
        cache: dict = {}

        def run(pixels):
            key = pixels.shape
            if key not in cache:
                cache.clear()
                cache[key] = runner.tensor(pixels)
            runner.forward(cache[key])

        return run

    runtime = f"torch-{device.split(':')[0]}" + ("-fp16" if fp16 else "")
    return bench_pair(
        runtime,
        detector,
        embedder,
        bare(det_runner),
        bare(rec_runner),
        images,
        args,
        clock,
        sync=det_runner.sync,
    )


# --- dlib's networks (issue #15) -----------------------------------------------------------------

DLIB_FILES = ("dlib_face_recognition_resnet_model_v1.dat", "mmod_human_face_detector.dat")


def dlib_files(folder: Path | None) -> tuple[Path, Path] | str:
    """The two .dat files, from ``folder`` or the installed face-recognition-models; else why not."""
    if folder:
        paths = tuple(folder / name for name in DLIB_FILES)
        missing = [p.name for p in paths if not p.is_file()]
        return f"--dlib-dat {folder} lacks {', '.join(missing)}" if missing else paths
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return "dlib's .dat files: face-recognition-models is not installed and --dlib-dat was not given"
    root = Path(list(spec.submodule_search_locations)[0]) / "models"
    return tuple(root / name for name in DLIB_FILES)


def dlib_runtimes(env: dict, args, graphs: dict, work: Path, report: dict) -> list[tuple[str, dict]]:
    """(name, {"resnet": session-like, "mmod": session-like}) per runtime that can run here."""
    from pipelines.core.models.dlib_onnx import open_dlib_session, session_options

    out = []
    providers = [
        p
        for p, name in (("tensorrt", "TensorrtExecutionProvider"), ("cuda", "CUDAExecutionProvider"))
        if name in env.get("ort_providers", [])
    ]
    if args.dry_run:
        providers = ["cpu"]
    for provider in providers:
        chain = ["tensorrt", "cuda"] if provider == "tensorrt" else [provider]
        options = session_options(chain, 0, work)
        top = max(args.dlib_batches)
        profile = ("chips:1x150x150x3", f"chips:{top}x150x150x3", f"chips:{top}x150x150x3")
        try:
            sessions = {
                "resnet": open_dlib_session(graphs["resnet"], options, profile),
                "mmod": open_dlib_session(graphs["mmod"], options),
            }
            out.append((f"ort-{provider}-fp32", sessions))
        except Exception as exc:  # noqa: BLE001 - one runtime failing must not lose the others' figures
            report["notes"].append(f"dlib on ort-{provider}: {type(exc).__name__}: {str(exc)[:300]}")
    gpu_ort = [p for p in providers if p != "cpu"]
    # PyTorch runs the same graphs where ORT cannot reach the GPU; --dry-run runs it on the CPU,
    # so that the whole path (TorchGraph, parity, report) is exercised on a machine without CUDA
    device = "cuda" if env.get("cuda") and not gpu_ort else ("cpu" if args.dry_run else None)
    if device and env.get("torch"):
        for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
            torch_sessions = _torch_sessions(graphs, device, report, dtype)
            if torch_sessions:
                out.append((f"torch-{device}-{short}", torch_sessions))
    if not out:
        report["notes"].append(
            "dlib on GPU: this onnxruntime has no CUDA or TensorRT provider and torch sees no CUDA device"
        )
    return out


def _torch_sessions(graphs: dict, device: str, report: dict, dtype: str = "float32") -> dict | None:
    try:
        import onnx
        import torch
        from gpu_nets import TorchGraph

        _fp32_only(torch)
        torch.backends.cudnn.benchmark = True  # the fastest float32 convolution per shape
        return {k: TorchGraph(onnx.load_from_string(g.data), device, dtype) for k, g in graphs.items()}
    except Exception as exc:  # noqa: BLE001
        report["notes"].append(f"dlib on torch-{device}: {type(exc).__name__}: {str(exc)[:300]}")
        return None


def _fp32_only(torch) -> None:
    """Float32 matmuls and convolutions without TF32, as the backend's GPU sessions. torch 2.9
    and later refuse to mix the legacy switches with the new ones, so the new ones when present."""
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _reference(env: dict, graphs: dict, report: dict) -> tuple[str, dict] | None:
    """The CPU reference: ONNX Runtime on the CPU, else PyTorch on the CPU."""
    if env.get("onnxruntime"):
        import onnxruntime as ort

        sessions = {
            k: ort.InferenceSession(g.data, providers=["CPUExecutionProvider"]) for k, g in graphs.items()
        }
        return "ort-cpu", sessions
    sessions = _torch_sessions(graphs, "cpu", report)
    return ("torch-cpu", sessions) if sessions else None


def _canvases(folder: Path, count: int, side: int = 512) -> list[np.ndarray]:
    """Test photos shrunk into side x side canvases: one size, so MMOD batches them all."""
    from PIL import Image, ImageOps

    files = sorted(folder.glob("*.jpg"))[:count] if folder.is_dir() else []
    out = []
    for path in files:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        image.thumbnail((side, side))
        canvas = Image.new("RGB", (side, side))
        canvas.paste(image, (0, 0))
        out.append(np.asarray(canvas))
    if not out:  # no photos: noise finds no faces but costs the same
        rng = np.random.default_rng(1)
        out = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)]
    return out


def dlib_rows(args, clock: Clock, report: dict, work: Path) -> list[Row]:
    """Descriptor faces/s and MMOD images/s per runtime and batch, with the difference to the CPU."""
    env = report["env"]
    files = dlib_files(args.dlib_dat)
    if isinstance(files, str):
        report["notes"].append(f"dlib skipped: {files}")
        return []
    try:
        from pipelines.core.models import dlib_mmod
        from pipelines.core.models.dlib_onnx import graph_bytes
        from pipelines.core.models.dlib_resnet_onnx import build_resnet_graph
    except ImportError as exc:
        report["notes"].append(f"dlib skipped: {exc} (carry its wheel with --wheels)")
        return []
    graphs = {
        "resnet": graph_bytes(files[0], "dlib_resnet_v1", build_resnet_graph, work),
        "mmod": graph_bytes(files[1], "dlib_mmod", dlib_mmod.build_mmod_graph, work),
    }
    report["dlib_graphs_sha256"] = {k: g.sha256 for k, g in graphs.items()}
    rng = np.random.default_rng(15)
    chips = rng.integers(0, 256, (max(args.dlib_batches), 150, 150, 3), dtype=np.uint8)
    images = _canvases(args.photos, 4 if args.dry_run else 16)
    reference = _reference(env, graphs, report)
    expected = boxes = None
    probe = chips[:8]
    if reference:
        ref_detector = dlib_mmod.MmodDetector(reference[1]["mmod"], max_batch=1)
        boxes = [ref_detector.detect([im])[0] for im in images]
        # the descriptor's parity on real faces: the reference's MMOD boxes, cropped as chips
        faces = face_crops(images, boxes)
        probe = np.concatenate([faces, chips[:8]]) if len(faces) else probe
        expected = reference[1]["resnet"].run(None, {"chips": probe})[0]
        report["notes"].append(
            f"dlib parity reference: {reference[0]}; descriptor on {len(faces)} face crops of the "
            f"photos and 8 random chips; MMOD on {len(images)} photos on 512x512 canvases"
        )
    rows = []
    for name, sessions in dlib_runtimes(env, args, graphs, work, report):
        try:
            rows += _dlib_runtime_rows(
                name, sessions, chips, probe, images, expected, boxes, args, clock, dlib_mmod
            )
        except Exception as exc:  # noqa: BLE001 - one runtime failing must not lose the others' figures
            report["notes"].append(f"dlib on {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
    return rows


DESCRIPTOR_TOLERANCE = 1e-5  # what sharing an index with dlib's descriptors needs


def _dlib_runtime_rows(
    name, sessions, chips, probe, images, expected, boxes, args, clock, dlib_mmod
) -> list[Row]:
    rows = []
    resnet = sessions["resnet"]
    sync = getattr(resnet, "sync", None)
    note = "no CPU reference"
    if expected is not None:
        diff = float(np.abs(resnet.run(None, {"chips": probe})[0] - expected).max())
        note = f"max abs diff to CPU {diff:.1e}" + ("" if diff <= DESCRIPTOR_TOLERANCE else " OVER 1e-5")
    for batch in args.dlib_batches:
        if not clock.allows(2):
            rows.append(Row(name, "dlib-descriptor", batch, note="skipped: time budget"))
            continue
        part = chips[:batch]
        calls, elapsed, util = timed(lambda p=part: resnet.run(None, {"chips": p}), args.seconds, sync)
        rows.append(Row(name, "dlib-descriptor", batch, None, calls * batch / elapsed, None, util, note))
    for batch in args.dlib_det_batches:
        if not clock.allows(3):
            rows.append(Row(name, "dlib-mmod-512", batch, note="skipped: time budget"))
            continue
        detector = dlib_mmod.MmodDetector(sessions["mmod"], max_batch=batch)
        found = detector.detect(images)
        same = "no CPU reference" if boxes is None else _compare_boxes(found, boxes)
        calls, elapsed, util = timed(lambda d=detector: d.detect(images), args.seconds)
        faces = sum(len(f) for f in found) / len(images)
        rate = calls * len(images) / elapsed
        # the network alone on tiles made beforehand: what the numpy pyramid and decoding cost
        tiles, _ = dlib_mmod.tile_pyramid(np.stack(images[:batch]), detector.spec)
        feed = {dlib_mmod.TILES: tiles}
        bare_calls, bare_elapsed, bare_util = timed(
            lambda f=feed: sessions["mmod"].run(None, f), args.seconds, sync
        )
        bare = bare_calls * batch / bare_elapsed
        rows.append(Row(name, "dlib-mmod-512", batch, rate, rate * faces, rate / bare, util, same))
        rows.append(Row(name, "dlib-mmod-bare", batch, bare, None, None, bare_util))
    return rows


def _compare_boxes(found, expected) -> str:
    """Whether the boxes equal the CPU reference's, and the largest score difference."""
    same, worst = True, 0.0
    for ours, theirs in zip(found, expected, strict=True):
        if [f[:4] for f in ours] != [f[:4] for f in theirs]:
            same = False
            continue
        worst = max([worst, *(abs(a[4] - b[4]) for a, b in zip(ours, theirs, strict=True))])
    return f"boxes equal to CPU: {same}, max score diff {worst:.1e}"


# --- CPU side --------------------------------------------------------------------------------


def _two_faces(pixels: np.ndarray) -> np.ndarray:
    """Landmarks of two plausible faces in an image: what alignment costs per image at 2 faces."""
    from pipelines.core.models.insightface_align import ARCFACE_TEMPLATE

    h, w = pixels.shape[:2]
    scale = min(h, w) / 400
    offsets = ([w * 0.2, h * 0.2], [w * 0.5, h * 0.4])
    return np.stack([ARCFACE_TEMPLATE * scale + o for o in offsets]).astype(np.float32)


def _cpu_work(data: bytes) -> tuple[float, float, float]:
    """Decode, letterbox and align one image; returns the seconds each stage took, as a triple."""
    from pipelines.core.decode import decode_image
    from pipelines.core.models.insightface_align import align
    from pipelines.core.models.insightface_detect import letterbox

    t0 = time.perf_counter()
    pixels = decode_image(data, 100_000_000).pixels
    t1 = time.perf_counter()
    letterbox([pixels], 640, 640)
    t2 = time.perf_counter()
    align([pixels], [_two_faces(pixels)])
    return (t1 - t0, t2 - t1, time.perf_counter() - t2)


def cpu_rows(encoded: list[bytes], args, clock) -> list[Row]:
    """Decode + letterbox + align of 2 faces per image: each stage in one process, then all of it
    on every core."""
    n = len(encoded)
    stages = np.array([_cpu_work(data) for data in encoded]).sum(axis=0)
    one = n / stages.sum()
    rows = [
        Row("cpu-1-process", f"cpu-{name}", 1, n / t, note="one process")
        for name, t in zip(("decode", "letterbox", "align2"), stages, strict=True)
    ]
    rows.append(Row("cpu-1-process", "cpu-side", 1, one, 2 * one, note="decode+letterbox+align"))
    if not clock.allows(2):
        return rows
    workers = os.cpu_count() or 1
    repeat = max(1, int(args.seconds * one * workers / n))
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_cpu_work, encoded[:workers])  # start-up and imports out of the timing
        start = time.perf_counter()
        done = len(pool.map(_cpu_work, encoded * repeat, chunksize=2))
        rate = done / (time.perf_counter() - start)
    rows.append(Row(f"cpu-{workers}-processes", "cpu-side", 1, rate, 2 * rate, note="decode+letterbox+align"))
    return rows


# --- inputs ----------------------------------------------------------------------------------


def load_photos(folder: Path, limit: int, max_side: int) -> tuple[list[np.ndarray], list[bytes], str]:
    """Decoded and encoded photos (shrunk to ``max_side`` if given); random-noise JPEGs of mixed
    sizes when the folder is missing."""
    from PIL import Image, ImageOps

    from pipelines.core.decode import decode_image

    files = sorted(folder.glob("*.jpg"))[:limit] if folder.is_dir() else []
    if files:
        encoded = [_shrink(p.read_bytes(), max_side, Image, ImageOps) for p in files]
        source = f"{len(files)} photos from {folder.name}" + (
            f", longest side {max_side}" if max_side else ""
        )
    else:
        rng = np.random.default_rng(0)
        encoded = []
        for _ in range(min(limit, 32)):
            h, w = (int(v) for v in rng.integers(400, 2000, 2))
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
            encoded.append(buffer.getvalue())
        source = f"{len(encoded)} synthetic noise JPEGs ({folder} missing)"
    return [decode_image(d, 100_000_000).pixels for d in encoded], encoded, source


def _shrink(data: bytes, max_side: int, Image, ImageOps) -> bytes:
    if not max_side:
        return data
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def convert_pack(det_path: Path, rec_path: Path, report: dict):
    """The real pack's graphs as torch modules (onnx2torch, carried as a wheel); None, None without it."""
    try:
        import onnx
        from onnx2torch import convert
    except ImportError:
        report["notes"].append("onnx2torch missing: the real pack cannot run in torch (carry its wheel)")
        return None, None
    return convert(onnx.load(str(det_path))).eval(), convert(onnx.load(str(rec_path))).eval()


def find_pack(folder: Path) -> tuple[Path, Path]:
    from pipelines.core.models.insightface_backend import find_models

    return find_models(folder)


# --- output ----------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    def num(v, digits=0):
        return "-" if v is None else f"{v:,.{digits}f}"

    lines = [
        f"{'runtime':<22} {'stage':<14} {'batch':>5} {'images/s':>10} {'faces/s':>10} {'x bare':>7} "
        f"{'GPU %':>6}  note"
    ]
    for r in rows:
        lines.append(
            f"{r.runtime:<22} {r.stage:<14} {r.batch:>5} {num(r.images_s):>10} {num(r.faces_s):>10} "
            f"{num(r.ratio_to_bare, 2):>7} {num(r.gpu_util):>6}  {r.note}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pack", type=Path, help="a folder with the real pack's .onnx files")
    ap.add_argument("--photos", type=Path, default=PHOTOS)
    ap.add_argument("--max-side", type=int, default=0, help="shrink the photos to this longest side first")
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later measurements are skipped")
    ap.add_argument("--det-batches", default="16,32,64")
    ap.add_argument("--embed-batches", default="64,128,256")
    ap.add_argument("--out", type=Path, default=REPO / ".bench" / "gpu.json")
    ap.add_argument("--wheels", help="folder of wheels to install missing dependencies from")
    ap.add_argument("--dlib-dat", type=Path, help="folder with dlib's two .dat files (default: installed)")
    ap.add_argument("--dlib-batches", default="1,32,128,512", help="descriptor batch sizes")
    ap.add_argument("--dlib-det-batches", default="1,8,16", help="MMOD batch sizes (512x512 images)")
    ap.add_argument("--no-dlib", action="store_true", help="skip dlib's networks")
    ap.add_argument("--no-insightface", action="store_true", help="skip the insightface networks")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, to check the script")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.seconds, args.det_batches, args.embed_batches = 0.5, "2", "4"
        args.dlib_batches, args.dlib_det_batches = "1,8", "1,2"
    args.det_batches = [int(b) for b in args.det_batches.split(",")]
    args.embed_batches = [int(b) for b in args.embed_batches.split(",")]
    args.dlib_batches = [int(b) for b in args.dlib_batches.split(",")]
    args.dlib_det_batches = [int(b) for b in args.dlib_det_batches.split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    clock = Clock(args.budget, args.seconds)
    report: dict = {
        "missing": preflight(args.wheels),
        "env": environment(),
        "gpu_run": False,
        "rows": [],
        "notes": [],
    }
    env = report["env"]
    report["gpu_run"] = bool(env.get("cuda"))
    if not report["gpu_run"]:
        report["notes"].append("no CUDA device: CPU figures only, not the GPU benchmark")
    if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(env["ort_providers"]):
        report["notes"].append(
            "onnxruntime has no CUDA or TensorRT provider (onnxruntime-gpu is not installed): no "
            "ort-cuda or ort-tensorrt rows"
            + ("; the same networks ran in PyTorch instead" if env.get("cuda") else "")
        )
    env["faiss"] = importlib.util.find_spec("faiss") is not None
    report["notes"].append(
        f"FAISS: not measured by this bench (faiss {'installed' if env['faiss'] else 'not installed'})"
    )
    images, encoded, source = load_photos(args.photos, 8 if args.dry_run else 64, args.max_side)
    report["notes"].append(f"inputs: {source}")
    rows: list[Row] = []
    if not args.no_dlib:
        with tempfile.TemporaryDirectory() as tmp:
            rows += dlib_rows(args, clock, report, Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        det_path = rec_path = None
        det_net = rec_net = None
        if args.no_insightface:
            pass
        elif args.pack:
            det_path, rec_path = find_pack(args.pack)
            report["notes"].append(f"graphs: real pack {args.pack.name} ({det_path.name}, {rec_path.name})")
            gpu_ort = {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(env["ort_providers"])
            if env.get("cuda") and not gpu_ort:
                det_net, rec_net = convert_pack(det_path, rec_path, report)
        elif env.get("torch"):
            det_net, rec_net = torch_networks()
            report["gmacs_per_image"] = {
                "detector_640": round(count_gmacs(det_net, (3, 640, 640)), 2),
                "embedder_112": round(count_gmacs(rec_net, (3, 112, 112)), 2),
            }
            det_path, rec_path = work / "det.onnx", work / "rec.onnx"
            for net, path, shape, n in (
                (det_net, det_path, (3, 640, 640), 9),
                (rec_net, rec_path, (3, 112, 112), 1),
            ):
                error = export_onnx(net, shape, path, n)
                if error:
                    report["notes"].append(f"ONNX export of {path.name} failed: {error}")
                    det_path = rec_path = None
            report["notes"].append("graphs: SCRFD-10G- and IResNet-50-shaped, random weights (torch)")
        gpu_providers = [
            p
            for p, name in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider"))
            if name in env.get("ort_providers", [])
        ]
        if args.dry_run:
            gpu_providers = ["cpu"]
        for provider in gpu_providers if det_path and not args.no_insightface else []:
            try:
                rows += ort_rows(provider, det_path, rec_path, images, args, clock, work)
            except Exception as exc:  # noqa: BLE001 - one runtime failing must not lose the others' figures
                report["notes"].append(f"ort-{provider} failed: {type(exc).__name__}: {str(exc)[:300]}")
        torch_device = "cuda" if env.get("cuda") else ("cpu" if args.dry_run else None)
        if args.no_insightface:
            torch_device = None
        if torch_device and det_net is not None and (not gpu_providers or gpu_providers == ["cpu"]):
            try:
                rows += torch_rows(det_net, rec_net, torch_device, images, args, clock, bool(args.pack))
            except Exception as exc:  # noqa: BLE001
                report["notes"].append(f"torch-{torch_device} failed: {type(exc).__name__}: {str(exc)[:300]}")
    try:
        rows += cpu_rows(encoded, args, clock)
    except Exception as exc:  # noqa: BLE001 - the GPU rows above must still be written
        report["notes"].append(f"CPU side failed: {type(exc).__name__}: {str(exc)[:300]}")
    report["rows"] = [asdict(r) for r in rows]
    report["seconds"] = round(time.monotonic() - clock.start, 1)
    print(
        f"device: {env.get('device')}  date: {env['date']}  torch {env.get('torch')}  "
        f"onnxruntime {env.get('onnxruntime')} {env.get('ort_providers')}"
    )
    print(table(rows))
    if report["missing"]:
        print("missing modules:", ", ".join(report["missing"]))
    for note in report["notes"]:
        print("note:", note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
