"""The insightface backend on CUDA and TensorRT: same faces as on the CPU. Skipped without a GPU.

Needs onnxruntime-gpu (``pip install 'faceaudit[gpu]'``); with a CPU-only ONNX Runtime the
tests say so and skip, because the backend itself refuses such a configuration (tested on the CPU
in tests/unit/test_insightface_units.py).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

ort = pytest.importorskip("onnxruntime")

from pipelines.core.config import ModelConfig  # noqa: E402
from pipelines.core.decode import decode_image  # noqa: E402
from pipelines.core.models import load_model  # noqa: E402
from tests.onnx_models import make_pack  # noqa: E402


def _need(provider: str) -> None:
    if provider not in ort.get_available_providers():
        pytest.skip(f"this ONNX Runtime has no {provider} (install faceaudit[gpu])")


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return make_pack(tmp_path_factory.mktemp("gpu-pack") / "tiny")


@pytest.fixture(scope="module")
def photos(faces_dir):
    return [decode_image(p.read_bytes(), 100_000_000) for p in sorted(faces_dir.glob("*.jpg"))[:24]]


@pytest.fixture(scope="module")
def on_cpu(pack, photos):
    return load_model(ModelConfig(backend="insightface", pack=str(pack))).analyze(photos)


def _compare(results, expected, box_atol: float, min_cosine: float, min_matched: float):
    """Faces found on both sides must agree; fp16 may move a few scores across the threshold."""
    matched = total = 0
    for faces, reference in zip(results, expected, strict=True):
        total += len(reference)
        for ref in reference:
            close = [f for f in faces if np.abs(f.bbox - ref.bbox).max() <= box_atol]
            if close:
                matched += 1
                assert float(close[0].embedding @ ref.embedding) >= min_cosine
    assert total and matched / total >= min_matched


def test_cuda_gives_the_cpu_faces(pack, photos, on_cpu, tmp_path):
    _need("CUDAExecutionProvider")
    model = load_model(ModelConfig(backend="insightface", pack=str(pack), providers=["cuda"]))
    assert "CUDAExecutionProvider" in model.detector.runner.session.get_providers()
    _compare(model.analyze(photos), on_cpu, box_atol=0.05, min_cosine=0.9999, min_matched=0.99)


def test_tensorrt_fp16_gives_the_cpu_faces_and_caches_engines(pack, photos, on_cpu, tmp_path):
    _need("TensorrtExecutionProvider")
    config = ModelConfig(
        backend="insightface",
        pack=str(pack),
        providers=["tensorrt", "cuda"],
        cache_dir=str(tmp_path),
        fp16=True,
    )
    model = load_model(config)
    assert model.detector.runner.session.get_providers()[0] == "TensorrtExecutionProvider"
    _compare(model.analyze(photos), on_cpu, box_atol=2.0, min_cosine=0.99, min_matched=0.9)
    assert any((tmp_path / "trt").iterdir()), "TensorRT engines are cached for the next worker"
