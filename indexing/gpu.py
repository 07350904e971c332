"""Optional GPU use: k-means training, coarse assignment during adds, and search.

Only a faiss GPU build (the ``gpu`` extra, faiss-gpu-cu12) has ``StandardGpuResources``. The GPU
only computes; what is written is always a CPU index, so a bundle built with a GPU and one built
without have the same format and either can be served by either.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import cache

import faiss

from pipelines.core.errors import ConfigError

INSTALL_HINT = "pip install 'faceaudit[gpu]' (faiss-gpu-cu12; needs an NVIDIA driver for CUDA 12)"

log = logging.getLogger(__name__)


def describe() -> dict:
    """Which faiss this process loaded: faiss-cpu and faiss-gpu-cu12 both install ``faiss``, and
    whichever was installed last shadows the other, so the file and the build are what tell."""
    gpu_build = hasattr(faiss, "StandardGpuResources")
    return {
        "faiss_file": getattr(faiss, "__file__", None),
        "faiss_version": getattr(faiss, "__version__", None),
        "gpu_build": gpu_build,
        "gpus": faiss.get_num_gpus() if gpu_build else 0,
    }


@cache
def _log_once() -> None:
    info = describe()
    log.info(
        "faiss %s from %s: %s build, %d GPU(s) visible",
        info["faiss_version"],
        info["faiss_file"],
        "GPU" if info["gpu_build"] else "CPU",
        info["gpus"],
    )


def available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def wanted(use_gpu: bool | None) -> bool:
    """None: use a GPU when one is there. True: require one, with a clear error if missing.
    Logs once which faiss was loaded (``describe``)."""
    _log_once()
    if use_gpu is None:
        return available()
    if use_gpu and not available():
        info = describe()
        raise ConfigError(
            f"a GPU was asked for but faiss sees none (faiss {info['faiss_version']} from "
            f"{info['faiss_file']}, {'GPU' if info['gpu_build'] else 'CPU'} build); {INSTALL_HINT}"
        )
    return use_gpu


def train(index: faiss.Index, vectors, use_gpu: bool) -> None:
    """Train ``index``; on a GPU the k-means assignments run there (faiss's clustering_index hook)."""
    if not use_gpu or faiss.try_extract_index_ivf(index) is None:
        index.train(vectors)
        return
    ivf = faiss.extract_index_ivf(index)
    # keep a Python reference: the C++ index does not own the GPU index we lend it
    gpu_flat = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    ivf.clustering_index = gpu_flat
    try:
        index.train(vectors)
    finally:
        ivf.clustering_index = None  # type: ignore[assignment]  # SWIG takes None as NULL
        del gpu_flat


@contextmanager
def gpu_quantizer(index: faiss.Index, use_gpu: bool):
    """While open, the IVF coarse quantizer runs on the GPU (adds assign there); restored after."""
    ivf = faiss.try_extract_index_ivf(index) if use_gpu else None
    if ivf is None:
        yield index
        return
    cpu_quantizer = ivf.quantizer
    gpu_q = faiss.index_cpu_to_all_gpus(cpu_quantizer)  # referenced here until restored
    ivf.quantizer = gpu_q
    try:
        yield index
    finally:
        ivf.quantizer = cpu_quantizer
        del gpu_q


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy for search; float16 lookup tables let PQ codes of up to 96 bytes fit."""
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16LookupTables = True  # type: ignore[attr-defined]  # GPU builds only
    return faiss.index_cpu_to_all_gpus(index, co=options)
