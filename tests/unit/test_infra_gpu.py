"""One CUDA line in the GPU image: the base image's CUDA, onnxruntime-gpu's CUDA build and the
nvidia-*-cu12 wheels that faiss-gpu-cu12 pulls agree; faiss-gpu is the only faiss there; the code
says which faiss it loaded. The slow test resolves the gpu extra against the registry and reads
the wheels' own Requires-Dist."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile.gpu"
LOCK = REPO / "infra" / "requirements" / "gpu.txt"


def _base_cuda() -> tuple[int, int]:
    (tag,) = re.findall(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-", DOCKERFILE.read_text(), re.M)
    return int(tag[0]), int(tag[1])


def _pins(lock: Path = LOCK) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", lock.read_text(), re.M))


def onnxruntime_cuda_major(version: str) -> int:
    """The CUDA major of the onnxruntime-gpu wheels on PyPI: 12 from 1.19 to 1.26, 13 from 1.27."""
    major, minor = (int(x) for x in version.split(".")[:2])
    return 13 if (major, minor) >= (1, 27) else 12


def test_onnxruntime_gpu_is_built_for_the_base_images_cuda():
    cuda_major, _ = _base_cuda()
    version = _pins()["onnxruntime-gpu"]
    assert onnxruntime_cuda_major(version) == cuda_major, (
        f"onnxruntime-gpu {version} needs CUDA {onnxruntime_cuda_major(version)}; the image has {cuda_major}"
    )


def test_the_nvidia_wheels_match_the_base_image():
    """faiss-gpu-cu12 pulls nvidia-cuda-runtime-cu12 and nvidia-cublas-cu12: the same CUDA major
    and minor as the base image, so one libcudart serves ONNX Runtime and faiss."""
    cuda = _base_cuda()
    pins = _pins()
    nvidia = {name: v for name, v in pins.items() if name.startswith("nvidia-")}
    assert nvidia, "faiss-gpu-cu12 pulls nvidia-* wheels"
    for name in nvidia:
        assert name.endswith(f"-cu{cuda[0]}"), f"{name}: not CUDA {cuda[0]}"
    runtime = tuple(int(x) for x in pins["nvidia-cuda-runtime-cu12"].split(".")[:2])
    assert runtime == cuda, f"nvidia-cuda-runtime-cu12 {runtime} against the image's CUDA {cuda}"


def test_faiss_gpu_is_the_only_faiss_in_the_gpu_images():
    pins = _pins()
    assert "faiss-gpu-cu12" in pins and "onnxruntime-gpu" in pins
    assert "faiss-cpu" not in pins, "faiss-cpu shadows faiss-gpu-cu12 (both install `faiss`)"
    assert "onnxruntime" not in pins, "onnxruntime shadows onnxruntime-gpu"
    worker = (REPO / "infra" / "dataflow" / "Dockerfile.worker-gpu").read_text()
    assert "pip install" not in worker, "the Dataflow GPU worker must not install over the GPU image"
    (beam,) = re.findall(r"ARG BEAM_VERSION=(\S+)", worker)
    assert _pins().get("apache-beam") == beam


def test_the_code_says_which_faiss_it_loaded(caplog):
    from indexing import gpu

    info = gpu.describe()
    assert info["faiss_file"] and Path(info["faiss_file"]).exists()
    assert info["gpu_build"] == hasattr(__import__("faiss"), "StandardGpuResources")
    gpu._log_once.cache_clear()
    with caplog.at_level("INFO", logger="indexing.gpu"):
        gpu.wanted(False)
    assert info["faiss_file"] in caplog.text and ("GPU build" in caplog.text or "CPU build" in caplog.text)


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, **kwargs)
    except subprocess.TimeoutExpired:
        pytest.skip("the package registry did not answer in time")
    if result.returncode != 0:
        offline = ("Max retries exceeded", "NewConnectionError", "Failed to establish", "Temporary failure",
                   "dns error", "error sending request", "Could not connect")  # fmt: skip
        if any(w in result.stderr for w in offline):
            pytest.skip(f"the package registry cannot be reached: {result.stderr[-300:]}")
        raise AssertionError(result.stderr[-2000:])
    return result


@pytest.mark.slow
def test_resolving_the_gpu_extra_gives_the_images_cuda(tmp_path):
    """Resolves the gpu extra for the image's Python and platform with uv (as compile.sh does),
    then reads each resolved wheel's Requires-Dist on nvidia-* packages (pip's report of the
    wheels' metadata; nothing is downloaded but the metadata)."""
    import tomllib

    uv = Path(sys.executable).parent / "uv"
    if not uv.exists():
        pytest.skip("uv is not installed (the dev extra installs it)")
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    compiled = _run(
        [str(uv), "pip", "compile", "-", "--python-version", "3.11", "--python-platform",
         "x86_64-manylinux_2_28", "--no-header", "--no-annotate", "--quiet"],
        input="\n".join(extra) + "\n",
    ).stdout  # fmt: skip
    pins = dict(re.findall(r"^(\S+)==(\S+)", compiled, re.M))
    cuda = _base_cuda()
    # what uv resolved: every nvidia-* wheel (faiss-gpu-cu12 pulls them) is of the image's CUDA
    nvidia = {n: v for n, v in pins.items() if n.startswith("nvidia-")}
    assert nvidia and all(n.endswith(f"-cu{cuda[0]}") for n in nvidia), nvidia
    assert tuple(int(x) for x in nvidia[f"nvidia-cuda-runtime-cu{cuda[0]}"].split(".")[:2]) == cuda
    # onnxruntime-gpu's own metadata: its "cuda" extra names the CUDA its binaries link against
    report = tmp_path / "report.json"
    _run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
         "--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
         "--target", str(tmp_path / "t"), "--report", str(report),
         f"onnxruntime-gpu=={pins['onnxruntime-gpu']}"],
        env={**__import__("os").environ, "PIP_CONSTRAINT": ""},
    )  # fmt: skip
    (ort,) = [i["metadata"] for i in json.loads(report.read_text())["install"]]
    assert onnxruntime_cuda_major(ort["version"]) == cuda[0]
    cuda_extra = [
        d for d in ort.get("requires_dist", []) if d.startswith("nvidia-") and 'extra == "cuda"' in d
    ]
    assert cuda_extra and all(f"-cu{cuda[0]}" in d.split()[0] for d in cuda_extra), cuda_extra
