"""dlib's networks on ONNX Runtime's CUDA and TensorRT providers: the same descriptors as on the CPU
(TF32 and fp16 off, so to 1e-5) and the same MMOD boxes. Skipped without a GPU.

Needs onnxruntime-gpu (``pip install 'faceaudit[gpu]'``); with a CPU-only ONNX Runtime the tests
say so and skip: the backend itself refuses such a configuration (onnx_session's rule).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

ort = pytest.importorskip("onnxruntime")

from pipelines.core.config import DecodeConfig, ModelConfig  # noqa: E402
from pipelines.core.decode import decode_image  # noqa: E402
from pipelines.core.models import load_model  # noqa: E402

PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


@pytest.fixture(scope="module")
def photos(faces_dir):
    limit = DecodeConfig().max_pixels
    return [decode_image(p.read_bytes(), limit) for p in sorted(faces_dir.glob("*.jpg"))[:16]]


@pytest.fixture(scope="module")
def on_cpu(photos, tmp_path_factory):
    cache = tmp_path_factory.mktemp("dlib-cpu")
    config = ModelConfig(detector="cnn", detect_max_side=512, cache_dir=str(cache))
    return load_model(config).analyze(photos)


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_the_gpu_gives_the_cpus_faces_and_descriptors(photos, on_cpu, provider, tmp_path):
    if PROVIDERS[provider] not in ort.get_available_providers():
        pytest.skip(f"this ONNX Runtime has no {PROVIDERS[provider]} (install faceaudit[gpu])")
    providers = ["tensorrt", "cuda"] if provider == "tensorrt" else ["cuda"]
    config = ModelConfig(
        detector="cnn", detect_max_side=512, providers=providers, cache_dir=str(tmp_path), embed_batch_size=8
    )
    model = load_model(config)
    assert model.provenance["providers"] == providers
    for got, expected in zip(model.analyze(photos), on_cpu, strict=True):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a.bbox, b.bbox)
            assert abs(a.det_score - b.det_score) < 1e-4
            assert np.abs(a.embedding - b.embedding).max() <= 1e-5
