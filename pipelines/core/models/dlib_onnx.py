"""dlib's networks as ONNX graphs: built once into the model cache, opened on the configured providers.

``graph_bytes(dat_file, builder, cache)`` returns the serialised ONNX graph of a dlib ``.dat``
file and its sha256. The graph is built at first use from the installed file (no weights are
redistributed) and kept under ``<cache_dir>/dlib-onnx/<name>-<dat sha256>-b<BUILDER>-<graph
sha256>.onnx``, so a changed ``.dat`` file or a changed builder gives a new entry. It is written
to a temporary file beside its final name and renamed into place: workers that race build the
same bytes and the last rename wins, and a reader never sees half a file. A cached graph whose
bytes do not hash to the sha256 in its name is built again. (Hashing is the check because it is
cheap: importing onnx to parse and check the graph took 0.5 s of every worker's start.)

``open_dlib_session`` opens an ONNX Runtime session with the rule of ``onnx_session``: exactly the
providers asked for, or a FatalError. On GPU providers TF32 and fp16 stay off, so that the
descriptors match dlib's float32 ones to 1e-5 and embeddings from both runtimes share an index:
CUDA's ``use_tf32`` is 0, TensorRT builds float32 engines, and ``NVIDIA_TF32_OVERRIDE=0`` (read by
cuBLAS, cuDNN and TensorRT) is set for the process before the first GPU session opens.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import FatalError
from .dlib_dat import DatError, Network, read_network
from .onnx_session import SessionOptions, open_session

# Bump when a builder's output changes, so that old cache entries are not used.
BUILDER = 1
CACHE_SUBDIR = "dlib-onnx"
GPU_PROVIDERS = {"cuda", "tensorrt"}
DEFAULT_CACHE = "~/.cache/faceaudit"  # as insightface_pack's
HASH_CHARS = 16  # hex digits of the graph's sha256 in its cache entry's name


@dataclass
class Graph:
    name: str
    data: bytes
    sha256: str
    dat_sha256: str


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def graph_bytes(dat_file: str | Path, name: str, builder: Callable[[Network], object], cache: Path) -> Graph:
    """The ONNX graph ``builder`` makes of ``dat_file``, from the cache or built into it."""
    dat = Path(dat_file).read_bytes()
    dat_sha = hashlib.sha256(dat).hexdigest()
    folder = Path(cache).expanduser() / CACHE_SUBDIR
    prefix = f"{name}-{dat_sha[:32]}-b{BUILDER}-"
    found = _cached(folder, prefix)
    if found is not None:
        return Graph(name, found[0], found[1], dat_sha)
    data = _build(dat, dat_file, builder)
    sha = hashlib.sha256(data).hexdigest()
    _write_atomic(folder / f"{prefix}{sha[:HASH_CHARS]}.onnx", data)
    return Graph(name, data, sha, dat_sha)


def _cached(folder: Path, prefix: str) -> tuple[bytes, str] | None:
    """A cache entry's bytes and sha256, if one hashes to the sha256 its name carries; a damaged
    entry is left to be overwritten by the rebuilt graph of the same name."""
    try:
        entries = sorted(folder.glob(f"{prefix}*.onnx"))
    except OSError:
        return None
    for entry in entries:
        try:
            data = entry.read_bytes()
        except OSError:
            continue
        sha = hashlib.sha256(data).hexdigest()
        if entry.name == f"{prefix}{sha[:HASH_CHARS]}.onnx":
            return data, sha
    return None


def _build(dat: bytes, dat_file, builder) -> bytes:
    try:
        network = read_network(dat)
        return builder(network).SerializeToString()
    except (DatError, ValueError) as exc:
        raise FatalError(f"dlib network file {Path(dat_file).name} cannot be used: {exc}") from exc


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename. A cache that cannot be written is not fatal: the
    graph is used from memory and built again by the next process."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def session_options(providers: list[str], threads: int, cache: Path) -> SessionOptions:
    return SessionOptions(
        providers=list(providers),
        trt_cache=str(Path(cache).expanduser() / "trt")
        if "tensorrt" in [p.lower() for p in providers]
        else None,
        fp16=False,
        threads=threads,
        tf32=False,
        # the engines run one worker process per core: threads that spin while waiting take the
        # cores the other workers' HOG, landmarks and decoding need
        spinning=False,
    )


def open_dlib_session(graph: Graph, options: SessionOptions, profile: tuple[str, str, str] | None = None):
    """A session for a dlib graph on exactly the requested providers, float32 throughout."""
    if GPU_PROVIDERS & {p.lower() for p in options.providers}:
        os.environ["NVIDIA_TF32_OVERRIDE"] = "0"  # read when cuBLAS/cuDNN/TensorRT load
    return open_session(graph.data, options, profile)


class DlibOnnxNets:
    """The descriptor session, and MMOD's where ``detector: cnn``, with what the manifest records."""

    def __init__(self, config, resnet_file: str, mmod_file: str):
        from .dlib_resnet_onnx import CHIP, INPUT, build_resnet_graph

        cache = Path(os.path.expanduser(config.cache_dir or DEFAULT_CACHE))
        options = session_options(config.providers, config.threads, cache)
        self.batch = config.embed_batch_size
        resnet = graph_bytes(resnet_file, "dlib_resnet_v1", build_resnet_graph, cache)
        shape = f"{CHIP}x{CHIP}x3"
        profile = (f"{INPUT}:1x{shape}", f"{INPUT}:{self.batch}x{shape}", f"{INPUT}:{self.batch}x{shape}")
        self._resnet = open_dlib_session(resnet, options, profile)
        self._input = INPUT
        graphs = {resnet.name: resnet}
        self._mmod = None
        if config.detector == "cnn":
            from . import dlib_mmod

            mmod = graph_bytes(mmod_file, "dlib_mmod", dlib_mmod.build_mmod_graph, cache)
            self._mmod = dlib_mmod.MmodDetector(
                open_dlib_session(mmod, options), max_batch=config.det_batch_size
            )
            graphs[mmod.name] = mmod
        self.provenance = {
            "runtime": "onnx",
            "providers": list(options.providers),
            "onnx_sha256": {name: g.sha256 for name, g in graphs.items()},
            "dat_sha256": {name: g.dat_sha256 for name, g in graphs.items()},
        }

    def embed(self, chips: list):
        """Descriptors of every image's chips ([faces, 150, 150, 3] uint8 each), run together in
        batches; back per image, in order, as [faces, 128] float32."""
        import numpy as np

        counts = [len(c) for c in chips]
        if not sum(counts):
            return [np.zeros((0, 128), np.float32) for _ in chips]
        flat = np.concatenate([c for c in chips if len(c)])
        parts = [
            self._resnet.run(None, {self._input: flat[i : i + self.batch]})[0]
            for i in range(0, len(flat), self.batch)
        ]
        vectors = np.concatenate(parts)
        return np.split(vectors, np.cumsum(counts)[:-1])

    def detect(self, images: list, upsample: int) -> list:
        """MMOD's (left, top, right, bottom, score) per image, in dlib's rectangle convention."""
        if self._mmod is None:
            raise FatalError("the MMOD detector was not loaded (model.detector is not cnn)")
        return self._mmod.detect(images, upsample=upsample)


def load_onnx_nets(config, resnet_file: str, mmod_file: str) -> DlibOnnxNets:
    return DlibOnnxNets(config, resnet_file, mmod_file)
