"""PDQ and the grouping of copies: the hash's behaviour on real photos, the 31-bit threshold's
edges, groups, and the copies table built from runs written before the PDQ columns."""

from __future__ import annotations

import hashlib

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from indexing import copies
from indexing.runs import Run, Shard
from pipelines.core import erasure, pdq


@pytest.fixture(scope="module")
def pixels(faces_dir) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(faces_dir / "img1.jpg")).convert("RGB"))


def flipped(code: bytes, bits: list[int]) -> bytes:
    raw = np.unpackbits(np.frombuffer(code, np.uint8))
    raw[bits] ^= 1
    return np.packbits(raw).tobytes()


def test_pdq_survives_resizing_and_reencoding_but_not_mirroring(pixels):
    code, quality = pdq.hash_pixels(pixels)
    assert len(code) == 32 and quality == 100
    half = np.asarray(Image.fromarray(pixels).resize((pixels.shape[1] // 2, pixels.shape[0] // 2)))
    assert pdq.hamming(code, pdq.hash_pixels(half)[0]) <= pdq.MATCH_DISTANCE
    mirrored = np.ascontiguousarray(pixels[:, ::-1])
    assert pdq.hamming(code, pdq.hash_pixels(mirrored)[0]) > pdq.MATCH_DISTANCE  # a documented limit
    assert pdq.hash_pixels(pixels.copy()) == (code, quality)  # deterministic


def test_a_flat_image_has_a_low_quality_and_odd_shapes_are_refused():
    flat = np.full((120, 90, 3), 128, np.uint8)
    assert pdq.hash_pixels(flat)[1] < pdq.MIN_QUALITY
    assert pdq.hash_pixels(np.zeros((1, 1, 3), np.uint8))[1] == 0  # one pixel: a hash, no quality
    with pytest.raises(ValueError):
        pdq.hash_pixels(np.zeros((10, 10), np.uint8))


def test_query_crops_find_a_copy_that_lost_part_of_its_area(pixels):
    height, width = pixels.shape[:2]
    cropped = pixels[height // 25 :, width // 30 :]  # 4% of the rows and 3% of the columns gone
    code = pdq.hash_pixels(cropped)[0]
    crops = pdq.hash_crops(pixels)
    assert len(crops) == 27
    assert min(pdq.hamming(code, c) for c, _ in crops) <= pdq.MATCH_DISTANCE


def test_grouping_threshold_is_31_bits_inclusive():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
    spread = list(rng.permutation(256)[:33])  # differences spread over every 16-bit slice
    near, far = flipped(base, spread[:31]), flipped(base, spread[:32])
    assert pdq.hamming(base, near) == 31 and pdq.hamming(base, far) == 32
    for other, together in ((near, True), (far, False)):  # apart: far is 1 bit from near
        codes = np.frombuffer(base + other, np.uint8).reshape(2, 32)
        assert copies.group_ids(codes, np.ones(2, bool)).tolist() == ([0, 0] if together else [0, 1])


def test_groups_are_transitive_and_unusable_hashes_stay_alone():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
    bits = list(rng.permutation(256))
    b = flipped(a, bits[:20])  # 20 from a
    c = flipped(b, bits[20:40])  # 20 from b, 40 from a: one group through b
    low = a  # the same hash, but of an image PDQ calls unreliable
    other = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
    codes = np.frombuffer(a + b + c + low + other, np.uint8).reshape(5, 32)
    usable = np.array([True, True, True, False, True])
    assert copies.group_ids(codes, usable).tolist() == [0, 0, 0, 3, 4]


def test_both_indexes_group_as_a_brute_force_scan_would():
    """The flat and the multi-hash index find exactly the pairs a brute-force comparison finds."""
    rng = np.random.default_rng(5)
    seeds = rng.integers(0, 256, (40, 32), dtype=np.uint8)
    codes = []
    for seed in seeds:
        for spread in (0, 12, 26, 31):
            codes.append(
                np.frombuffer(flipped(seed.tobytes(), list(rng.permutation(256)[:spread])), np.uint8)
            )
    codes = np.stack(codes)
    bits = np.unpackbits(codes[:, None, :] ^ codes[None, :, :], axis=2).sum(axis=2)
    multi = faiss.IndexBinaryMultiHash(256, 16, 16)
    multi.nflip = 1  # the alternative bench/pdq.py measures: it must group alike
    for index in (copies.binary_index(), multi):
        groups = copies.group_ids(codes, np.ones(len(codes), bool), index)
        for i in range(len(codes)):
            for j in range(len(codes)):
                if bits[i, j] <= 31:
                    assert groups[i] == groups[j]
        assert len(set(groups.tolist())) == 40  # random seeds lie about 128 bits apart


def write_old_images(path, rows: list[dict]) -> Shard:
    """An images shard as runs wrote it before the provenance and PDQ columns."""
    table = pa.table(
        {
            "image_sha256": [r["sha"] for r in rows],
            "dataset": [r["dataset"] for r in rows],
            "source_uri": [r["uri"] for r in rows],
            "status": ["no_face"] * len(rows),
        }
    )
    pq.write_table(table, path)
    return Shard(str(path), hashlib.sha256(path.read_bytes()).hexdigest(), len(rows))


def test_runs_without_pdq_columns_still_give_a_copies_table(tmp_path):
    rows = [
        {"sha": "a" * 64, "dataset": "old", "uri": "/x/1.jpg"},
        {"sha": "a" * 64, "dataset": "old", "uri": "/x/1.jpg"},  # the same occurrence twice (resumed)
        {"sha": "b" * 64, "dataset": "old", "uri": "/x/2.jpg"},
        {"sha": None, "dataset": "old", "uri": "/x/unreadable.jpg"},
    ]
    shard = write_old_images(tmp_path / "part-0.parquet", rows)
    run = Run(str(tmp_path), {"datasets": [{"name": "old", "version": "1"}]}, "0" * 64, [], [shard])
    table = copies.copies_table(copies.image_rows([run], erasure.EMPTY))
    assert table.schema == copies.SCHEMA
    assert table.column("image_sha256").to_pylist() == ["a" * 64, "b" * 64]
    assert table.column("group").to_pylist() == [0, 1] and table.column("pdq").null_count == 2
    (occurrence,) = table.column("occurrences").to_pylist()[0]
    assert occurrence["version"] == "1" and occurrence["origin_url"] is None
    found = copies.Copies(table).by_url("/x/2.jpg")
    assert [(f.image_sha256, f.via, f.matched) for f in found] == [("b" * 64, "url", ["old"])]


def test_flickr_photo_ids_are_read_from_flickr_urls():
    assert copies.flickr_photo_id("https://farm4.staticflickr.com/3456/5550123_abcdef_b.jpg") == "5550123"
    assert copies.flickr_photo_id("https://www.flickr.com/photos/12345@N00/5550124/") == "5550124"
    assert copies.flickr_photo_id("https://example.org/photos/5550125") is None
    assert copies.flickr_photo_id(None) is None
