"""A job with the insightface backend, end to end on the local engine, with generated models."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from pipelines.core.config import ModelConfig  # noqa: E402
from pipelines.core.decode import decode_image  # noqa: E402
from pipelines.core.errors import ConfigError  # noqa: E402
from pipelines.core.models import load_model  # noqa: E402
from pipelines.engines.local_engine import run_job  # noqa: E402
from tests.helpers import make_job, manifest, read_table, write_small_copies  # noqa: E402
from tests.onnx_models import make_pack  # noqa: E402


@pytest.fixture(scope="module")
def photos(tmp_path_factory, faces_dir):
    """20 shared photos at up to 800 px, with the group photos, so that some have many faces."""
    folder = tmp_path_factory.mktemp("if-photos")
    chosen = sorted(faces_dir.glob("img*.jpg"))[:18] + [
        faces_dir / "couple.jpg",
        faces_dir / "selfie-many-people.jpg",
    ]
    write_small_copies(chosen, folder, 800)
    return folder


@pytest.fixture(scope="module")
def model_config(tmp_path_factory) -> ModelConfig:
    pack = make_pack(tmp_path_factory.mktemp("if-pack") / "tiny")
    return ModelConfig(backend="insightface", pack=str(pack), providers=["cpu"], threads=1, max_faces=8)


@pytest.fixture(scope="module")
def insightface_run(tmp_path_factory, photos, model_config):
    out = tmp_path_factory.mktemp("if-run")
    job = make_job(
        out,
        ("small", photos),
        run_id="if",
        model=model_config,
        images_per_shard=6,
        workers=2,  # worker processes, each loading the sessions once
    )
    return run_job(job)


def test_run_writes_valid_shards(insightface_run, photos, model_config):
    run = insightface_run.uri
    body = manifest(run)
    assert (body["model_id"], body["dim"], body["match_threshold"]) == ("insightface-tiny", 512, 0.4)
    assert body["model"]["pack_license"] == "unknown" and body["model"]["providers"] == ["cpu"]
    images = read_table(run, "images").to_pylist()
    faces = read_table(run, "faces").to_pylist()
    assert len(images) == 20 and body["counts"]["images"] == 20 and body["counts"]["error"] == 0
    assert body["counts"]["faces"] == len(faces) > 10
    assert {r["status"] for r in images} == {"ok", "no_face"}
    by_image: dict[str, list[dict]] = {}
    for row in faces:
        by_image.setdefault(row["image_sha256"], []).append(row)
    sizes = {r["image_sha256"]: (r["width"], r["height"], r["n_faces"]) for r in images}
    for sha, rows in by_image.items():
        width, height, n_faces = sizes[sha]
        rows.sort(key=lambda r: r["face_index"])
        assert len(rows) == n_faces <= 8
        assert [r["det_score"] for r in rows] == sorted((r["det_score"] for r in rows), reverse=True)
        for row in rows:
            x1, y1, x2, y2 = row["bbox"]
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height and row["det_score"] >= 0.5
            assert len(row["landmarks"]) == 10 and row["model_id"] == "insightface-tiny"
            assert np.linalg.norm(row["embedding"]) == pytest.approx(1.0, abs=1e-5)

    # the workers' rows are what the model gives in this process, image by image
    model = load_model(model_config)
    busiest = max(images, key=lambda r: r["n_faces"])
    photo = photos / busiest["source_uri"].rsplit("/", 1)[-1]
    expected = model.analyze([decode_image(photo.read_bytes(), 100_000_000)])[0]
    rows = sorted((r for r in faces if r["source_uri"].endswith(photo.name)), key=lambda r: r["face_index"])
    assert len(rows) == len(expected) > 0
    for row, face in zip(rows, expected, strict=True):
        np.testing.assert_allclose(row["bbox"], face.bbox, atol=1e-3)
        np.testing.assert_allclose(row["embedding"], face.embedding, atol=1e-5)


def test_an_index_refuses_to_mix_insightface_and_dlib_vectors(tmp_path, insightface_run, photos):
    from indexing import build_index

    dlib_run = run_job(make_job(tmp_path / "dlib", ("small", photos), run_id="dlib", workers=1))
    assert manifest(dlib_run.uri)["model_id"] != manifest(insightface_run.uri)["model_id"]
    with pytest.raises(ConfigError, match="mix models"):
        build_index([insightface_run.uri, dlib_run.uri], str(tmp_path / "index"))
    assert not (tmp_path / "index" / "CURRENT").exists()
