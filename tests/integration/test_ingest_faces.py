"""The ingest core on the real shared photos with the real dlib models."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipelines.core.models.dlib_backend import DLIB_MATCH_THRESHOLD
from pipelines.core.schema import IMAGES_SCHEMA, faces_schema
from tests.helpers import largest_face_embeddings, manifest, read_table


def test_every_shared_photo_yields_a_face(faces_run, faces_dir):
    images = read_table(faces_run.uri, "images").to_pylist()
    photos = sorted(p.name for p in faces_dir.glob("*.jpg"))
    assert sorted(Path(r["source_uri"]).name for r in images) == photos  # the csv files are not images
    no_face = [Path(r["source_uri"]).name for r in images if r["status"] != "ok"]
    assert no_face == []
    assert all(r["n_faces"] >= 1 and r["width"] > 0 and r["height"] > 0 for r in images)


def test_pairs_are_separated_at_the_documented_threshold(faces_run, master_pairs):
    emb = largest_face_embeddings(faces_run.uri)
    correct = 0
    for x, y, same in master_pairs:
        similarity = float(emb[x] @ emb[y])
        correct += (similarity >= DLIB_MATCH_THRESHOLD) == same
    accuracy = correct / len(master_pairs)
    assert accuracy >= 0.99, accuracy


def test_schemas_are_exactly_the_design(faces_run):
    run = Path(faces_run.uri)
    for part in (run / "faces").glob("part-*.parquet"):
        assert pq.read_schema(part).remove_metadata() == faces_schema(128)
    for part in (run / "images").glob("part-*.parquet"):
        assert pq.read_schema(part).remove_metadata() == IMAGES_SCHEMA


def test_faces_agree_with_images_and_are_normalised(faces_run):
    faces = read_table(faces_run.uri, "faces").to_pylist()
    images = read_table(faces_run.uri, "images").to_pylist()
    per_image = {r["image_sha256"]: r["n_faces"] for r in images}
    counted: dict[str, list[int]] = {}
    for f in faces:
        counted.setdefault(f["image_sha256"], []).append(f["face_index"])
        assert abs(np.linalg.norm(f["embedding"]) - 1) < 1e-5
        x1, y1, x2, y2 = f["bbox"]
        assert 0 <= x1 < x2 and 0 <= y1 < y2
        assert f["model_id"] == "dlib-hog+dlib-resnet-v1"
    assert {sha: sorted(ix) for sha, ix in counted.items()} == {
        sha: list(range(n)) for sha, n in per_image.items() if n
    }
    by_image: dict[str, list[float]] = {}
    for f in sorted(faces, key=lambda f: f["face_index"]):
        by_image.setdefault(f["image_sha256"], []).append(f["det_score"])
    assert all(scores == sorted(scores, reverse=True) for scores in by_image.values())


def test_manifest_lists_every_shard_with_its_checksum(faces_run):
    run = Path(faces_run.uri)
    body = manifest(run)
    assert body["counts"]["images"] == 64 and body["counts"]["ok"] == 64
    assert body["counts"]["faces"] == read_table(run, "faces").num_rows
    listed = {s["file"]: s["sha256"] for s in body["shards"]}
    on_disk = {str(p.relative_to(run)) for p in run.glob("*/part-*.parquet")}
    assert set(listed) == on_disk
    for rel, sha in listed.items():
        assert hashlib.sha256((run / rel).read_bytes()).hexdigest() == sha
    assert body["model_id"] == "dlib-hog+dlib-resnet-v1" and body["dim"] == 128
