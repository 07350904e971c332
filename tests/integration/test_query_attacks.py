"""Hostile query photos and resealed manifests against ``faceaudit search`` / ``erase --photo``.

A query photo is read with ingest's cap and regular-file check and decoded in an isolated worker
under its limits; a manifest cannot lower the match threshold to 0 or point the model at files
outside the model cache.
"""

from __future__ import annotations

import pytest

from indexing import build_index, open_index
from indexing.errors import QueryError
from indexing.photos import model_config, search_photos
from tests.hostile import png_bytes


@pytest.fixture(scope="module")
def small_index(faces_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("query-index")
    build_index([faces_run.uri], str(out))
    return open_index(str(out))


@pytest.mark.timeout(120)
def test_a_device_as_a_query_photo_is_refused_before_any_read(small_index):
    (photo,) = search_photos(small_index, ["/dev/zero"], k=5).photos
    assert photo.status == "error" and photo.error == "not a regular file" and photo.faces == []


@pytest.mark.timeout(300)
def test_a_decompression_bomb_is_decoded_in_an_isolated_worker(small_index, tmp_path, monkeypatch):
    """A 16-bit 7999x7999 PNG of a few hundred KB: the pixels would take gigabytes in this process."""
    side = 7999
    row = bytes(1 + side * 2)  # filter byte and one row of 16-bit grey zeros
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(side, side, 16, 0, row * side))
    assert bomb.stat().st_size < 1 << 20  # small on disk

    import pipelines.core.decode as decode

    def never_here(*args, **kwargs):
        raise AssertionError("a query photo was decoded in the searching process")

    monkeypatch.setattr(decode, "decode_image", never_here)  # the worker is a fresh process
    (photo,) = search_photos(small_index, [str(bomb)], k=5).photos
    assert photo.status in ("error", "no_face")


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.0, 7.0])
def test_a_threshold_outside_zero_one_is_refused(small_index, threshold):
    with pytest.raises(QueryError, match=r"\(0, 1\)"):
        search_photos(small_index, ["/dev/null"], k=5, threshold=threshold)


@pytest.mark.parametrize(
    "model",
    [
        {"backend": "insightface", "pack": "/home/u/elsewhere"},
        {"backend": "insightface", "pack": "gs://other-bucket/pack"},
        {"backend": "insightface", "pack": "buffalo_l", "pack_root": "/tmp/planted"},
        {"backend": "insightface", "pack": "buffalo_l", "cache_dir": "/tmp/planted"},
    ],
)
def test_a_manifest_model_outside_the_model_cache_is_refused(small_index, model):
    class Resealed:
        manifest = {**small_index.manifest, "model": model}

    with pytest.raises(QueryError, match="outside the model cache"):
        model_config(Resealed())


def test_a_named_pack_is_fine():
    class Named:
        manifest = {"model": {"backend": "insightface", "pack": "buffalo_l"}}

    assert model_config(Named()).pack == "buffalo_l"
