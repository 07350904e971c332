"""bench/gpu_nets.TorchGraph, which bench/gpu.py uses to time dlib's ONNX graphs on CUDA where ONNX
Runtime has no CUDA provider: the same descriptors (to 1e-5) and the same MMOD boxes as ONNX
Runtime on the CPU, on the CPU and, where torch sees one, on the GPU. Marked gpu: it needs torch,
which the project does not install (on a developer machine: a venv with torch and
FACEAUDIT_GPU_TESTS=1). The .dat files: face-recognition-models, else FACEAUDIT_DLIB_DAT or
.bench/dlib-dat (bench/gpu_call.sh prepare).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from pipelines.core.models import dlib_mmod  # noqa: E402
from pipelines.core.models.dlib_onnx import graph_bytes  # noqa: E402
from pipelines.core.models.dlib_resnet_onnx import build_resnet_graph  # noqa: E402

RESNET, MMOD = "dlib_face_recognition_resnet_model_v1.dat", "mmod_human_face_detector.dat"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dat_folder():
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is not None and spec.submodule_search_locations:
        return os.path.join(list(spec.submodule_search_locations)[0], "models")
    folder = os.environ.get("FACEAUDIT_DLIB_DAT", str(REPO / ".bench" / "dlib-dat"))
    if not os.path.isfile(os.path.join(folder, MMOD)):
        pytest.skip("dlib's .dat files: no face-recognition-models, FACEAUDIT_DLIB_DAT or .bench/dlib-dat")
    return folder


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder, cache = _dat_folder(), tmp_path_factory.mktemp("dlib-graphs")
    return {
        "resnet": graph_bytes(os.path.join(folder, RESNET), "dlib_resnet_v1", build_resnet_graph, cache),
        "mmod": graph_bytes(os.path.join(folder, MMOD), "dlib_mmod", dlib_mmod.build_mmod_graph, cache),
    }


@pytest.fixture(scope="module")
def photos(faces_dir):
    from PIL import Image, ImageOps

    out = []
    for path in sorted(faces_dir.glob("*.jpg"))[:6]:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        image.thumbnail((512, 512))
        out.append(np.asarray(image))
    return out


def _sessions(graphs, device):
    gpu_nets = _bench_module("gpu_nets")
    cpu = {k: ort.InferenceSession(g.data, providers=["CPUExecutionProvider"]) for k, g in graphs.items()}
    ours = {k: gpu_nets.TorchGraph(onnx.load_from_string(g.data), device) for k, g in graphs.items()}
    return cpu, ours


@pytest.mark.parametrize("device", DEVICES)
def test_torch_graph_finds_the_same_faces_and_descriptors_as_onnx_runtime(graphs, photos, device):
    if device == "cuda":  # float32 as the backend's GPU sessions: no TF32
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    cpu, ours = _sessions(graphs, device)
    expected = dlib_mmod.MmodDetector(cpu["mmod"], max_batch=2).detect(photos)
    found = dlib_mmod.MmodDetector(ours["mmod"], max_batch=2).detect(photos)
    assert sum(len(f) for f in expected) >= 5  # the photos have faces: the check is not empty
    for got, want in zip(found, expected, strict=True):
        assert [f[:4] for f in got] == [f[:4] for f in want]
        np.testing.assert_allclose([f[4] for f in got], [f[4] for f in want], atol=1e-4)
    chips = _bench_module("gpu_nets").face_crops(photos, expected)
    chips = np.concatenate([chips, np.random.default_rng(0).integers(0, 256, (3, 150, 150, 3), np.uint8)])
    want = cpu["resnet"].run(None, {"chips": chips})[0]
    got = ours["resnet"].run(None, {"chips": chips})[0]
    assert got.shape == want.shape == (len(chips), 128)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_torch_graph_refuses_an_op_it_does_not_know(graphs):
    gpu_nets = _bench_module("gpu_nets")
    model = onnx.load_from_string(graphs["mmod"].data)
    model.graph.node[1].op_type = "LeakyRelu"
    with pytest.raises(ValueError, match="LeakyRelu"):
        gpu_nets.TorchGraph(model, "cpu")
