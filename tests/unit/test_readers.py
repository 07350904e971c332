"""The record formats' readers (pipelines/core/readers) through sources.plan_units / read_unit:
deterministic row-range units, bounded lines, format detection and refusal, only the needed
Parquet columns, flat memory on a big TSV, and provenance that never holds more than it should."""

from __future__ import annotations

import io
import json
import random
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.core.config import DatasetSpec, HttpConfig
from pipelines.core.errors import ConfigError
from pipelines.core.readers import common, lines
from pipelines.core.roots import OUTSIDE
from pipelines.core.sources import plan_units, read_unit
from tests import format_fixtures as ff

HTTP = HttpConfig()


def jpeg(colour=(200, 30, 30), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


PHOTOS = [jpeg((i * 40, 30, 30)) for i in range(5)]


def read_all(spec: DatasetSpec, unit_size: int = 2, http: HttpConfig = HTTP) -> list:
    return [raw for unit in plan_units(spec, unit_size) for raw in read_unit(unit, http)]


def spec(source, fmt="auto", **kw) -> DatasetSpec:
    return DatasetSpec(name="d", source=str(source), format=fmt, **kw)


def test_line_units_cover_every_row_once_whatever_the_chunking(tmp_path, monkeypatch):
    monkeypatch.setattr(lines, "CHUNK", 7)  # boundaries fall inside lines, on newlines, anywhere
    rng = random.Random(17)
    path = tmp_path / "f"
    for _ in range(200):
        body = [b"x" * rng.randint(0, 12) for _ in range(rng.randint(0, 25))]
        data = b"\n".join(body) + (b"\n" if body and rng.random() < 0.5 else b"")
        path.write_bytes(data)
        every, skip = rng.randint(1, 5), rng.choice([0, 1])
        spans = lines.unit_spans(str(path), every, skip)
        got = [pair for r, s, e in spans for pair in lines.read_lines(str(path), s, e, r, 100)]
        physical = data.split(b"\n")[: data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)]
        assert got == [(i - skip, line) for i, line in enumerate(physical) if i >= skip]
        assert [s[0] for s in spans] == list(range(0, len(got), every))
        assert spans == lines.unit_spans(str(path), every, skip)  # the same listing, the same units


def test_a_line_over_the_limit_is_one_error_and_the_next_line_still_reads(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"short\n" + b"y" * 5000 + b"\nafter\n")
    assert list(lines.read_lines(str(path), 0, path.stat().st_size, 0, 100)) == [
        (0, b"short"),
        (1, None),
        (2, b"after"),
    ]


def test_msceleb_rows_keep_face_id_and_urls_and_drop_the_mid(tmp_path):
    fixture = ff.msceleb_tsv(tmp_path, PHOTOS)
    raws = read_all(spec(fixture.source))
    assert [r.source_uri for r in raws] == [*fixture.good, *fixture.broken]
    for raw in raws:
        if raw.source_uri in fixture.good:
            assert raw.error is None and raw.data in PHOTOS
            assert raw.provenance == fixture.good[raw.source_uri]
        else:
            assert fixture.broken[raw.source_uri] in raw.error
    text = json.dumps([[r.source_uri, r.error, r.provenance] for r in raws])
    assert not [label for label in fixture.labels if label in text]


def test_a_crop_larger_than_max_bytes_is_an_error_row(tmp_path):
    fixture = ff.msceleb_tsv(tmp_path, PHOTOS, broken=False)
    raws = read_all(spec(fixture.source), http=HttpConfig(max_bytes=600))
    assert [r.error for r in raws] == ["larger than max_bytes (600)"] * len(PHOTOS)
    assert [r.provenance for r in raws] == list(fixture.good.values())


def test_hf_parquet_reads_only_the_image_and_id_columns(tmp_path):
    fixture = ff.hf_parquet(tmp_path, PHOTOS, row_group_size=3)
    units = plan_units(spec(fixture.source), 2)
    assert {u.columns for u in units} == {("image", "id")}
    # row groups of 3 rows (8 rows in all), sliced into runs of at most 2
    assert [u.span for u in units] == [(0, 0, 0, 2), (2, 0, 2, 1), (3, 1, 0, 2), (5, 1, 2, 1), (6, 2, 0, 2)]
    raws = [r for u in units for r in read_unit(u, HTTP)]
    assert [r.source_uri for r in raws] == [*fixture.good, *fixture.broken]
    assert [r.provenance for r in raws[: len(PHOTOS)]] == list(fixture.good.values())
    assert [r.data for r in raws[: len(PHOTOS)]] == PHOTOS


def test_hf_parquet_without_an_id_column_and_with_plain_binary_images(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"img": pa.array(PHOTOS, pa.binary()), "label": list(range(5))}), path)
    units = plan_units(spec(path, image_column="img"), 10)
    assert units[0].columns == ("img",)
    raws = [r for u in units for r in read_unit(u, HTTP)]
    assert [r.data for r in raws] == PHOTOS and {r.provenance for r in raws} == {None}


def test_hf_paths_stay_inside_the_data_set(tmp_path):
    (tmp_path / "outside.jpg").write_bytes(PHOTOS[0])
    inner = tmp_path / "set"
    inner.mkdir()
    fixture = ff.hf_parquet(inner, PHOTOS, path_only=True)
    raws = read_all(spec(inner, "hf-parquet"))
    assert [r.data for r in raws[: len(PHOTOS)]] == PHOTOS
    assert raws[len(PHOTOS) + 1].error == OUTSIDE  # ../../outside.jpg: nothing opened
    assert len(raws) == len(fixture.good) + len(fixture.broken)


def test_flickr_entries_that_are_paths_resolve_against_the_metadata_folder(tmp_path):
    (tmp_path / "p.jpg").write_bytes(PHOTOS[0])
    lines_ = [{"url": "p.jpg", "photo_id": 7, "owner": "1@N01"}, {"url": "/etc/hostname", "photo_id": 8}]
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines_) + "\n")
    raws = read_all(spec(path))
    assert raws[0].data == PHOTOS[0] and raws[0].provenance == {
        "record_id": "7",
        "origin_url": "p.jpg",
        "owner": "1@N01",
    }
    assert raws[1].error == OUTSIDE


def test_hostile_flickr_lines_are_error_rows(tmp_path):
    path = tmp_path / "meta.jsonl"
    bad = ["[" * 60_000, '"just a string"', "{" + '"a":1,' * 20_000 + '"url":"x"}' + "{" * 10, "\x00" * 10]
    path.write_text(json.dumps({"url": "http://127.0.0.1/x.jpg"}) + "\n" + "\n".join(bad) + "\n")
    raws = read_all(spec(path), unit_size=10)[1:]
    assert len(raws) == len(bad) and all(r.error and r.data is None for r in raws)
    assert {r.error for r in raws} >= {"not a JSON object (broken JSON)", "not a JSON object (a str)"}


def test_auto_tells_the_formats_from_their_endings_and_first_bytes(tmp_path, monkeypatch):
    ms = ff.msceleb_tsv(tmp_path, PHOTOS[:1], broken=False).source
    hf = ff.hf_parquet(tmp_path, PHOTOS[:1]).source
    flickr = tmp_path / "f.csv"
    flickr.write_text("photo_id,url,owner\n1,http://example.org/1.jpg,1@N01\n")
    uri_list = tmp_path / "l.csv"
    uri_list.write_text("url\nhttp://example.org/1.jpg\n")
    uri_parquet = tmp_path / "l.parquet"
    pq.write_table(pa.table({"url": ["http://example.org/1.jpg"]}), uri_parquet)
    unnamed = tmp_path / "data.bin"
    unnamed.write_bytes(hf.read_bytes())
    kinds = {
        ms: "msceleb-tsv",
        hf: "hf-parquet",
        flickr: "flickr-meta",
        uri_list: "urilist",
        uri_parquet: "urilist",
        unnamed: "hf-parquet",
    }
    for source, kind in kinds.items():
        assert plan_units(spec(source), 5)[0].kind == kind, source


@pytest.mark.parametrize(
    "fixture_name, fmt, says",
    [
        ("hf", "msceleb-tsv", "is not an MS-Celeb TSV"),
        ("ms", "hf-parquet", "is not hf-parquet: not a Parquet file"),
        ("ms", "flickr-meta", "is not flickr-meta CSV"),
        ("ms", "folder", "is a file, not of format folder"),
        ("ms", "unknown", "its format is unknown"),
    ],
)
def test_a_file_not_of_its_declared_format_is_a_config_error(tmp_path, fixture_name, fmt, says):
    (tmp_path / "a").mkdir()
    make = ff.msceleb_tsv if fixture_name == "ms" else ff.hf_parquet
    fixture = make(tmp_path / "a", PHOTOS)
    source = fixture.source
    if fmt == "flickr-meta":
        source = source.rename(source.with_suffix(".csv"))
    with pytest.raises(ConfigError, match=says):
        plan_units(spec(source, fmt), 5)


def test_a_parquet_without_its_image_column_is_a_config_error(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"image": [1, 2]}), path)
    with pytest.raises(ConfigError, match="not a struct with bytes and/or path"):
        plan_units(spec(path, "hf-parquet"), 5)
    with pytest.raises(ConfigError, match="has no column 'picture'"):
        plan_units(spec(path, "hf-parquet", image_column="picture"), 5)


def test_a_file_broken_after_planning_ends_its_unit_with_one_error_row(tmp_path):
    fixture = ff.hf_parquet(tmp_path, PHOTOS, row_group_size=8)
    units = plan_units(spec(fixture.source), 8)
    fixture.source.write_bytes(b"PAR1 and then nothing a Parquet reader can use PAR1")
    raws = [r for u in units for r in read_unit(u, HTTP)]
    assert len(raws) == 1 and raws[0].source_uri.endswith("#row=0") and "broken file" in raws[0].error


def _peak_reading(path) -> tuple[int, int]:
    """(images read, peak traced bytes) of planning and reading the whole file."""
    tracemalloc.start()
    try:
        n = sum(1 for u in plan_units(spec(path), 1000) for raw in read_unit(u, HTTP) if raw.data)
        return n, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_big_tsv_is_planned_and_read_in_flat_memory(tmp_path):
    """20k rows (~19 MB; bench/read_formats.py measures 100k) need no more memory than 5k: planning
    and reading hold a chunk and a few rows at a time, never the file."""
    small, big = tmp_path / "small.tsv", tmp_path / "big.tsv"
    ff.write_msceleb_rows(small, 5_000, [PHOTOS[0]])
    ff.write_msceleb_rows(big, 20_000, [PHOTOS[0]])
    (n_small, peak_small), (n_big, peak_big) = _peak_reading(small), _peak_reading(big)
    assert (n_small, n_big) == (5_000, 20_000)
    assert peak_big < 1.5 * peak_small and peak_big < big.stat().st_size / 4


def test_provenance_keeps_short_printable_values_of_its_own_fields_only():
    kept = common.provenance(record_id=" 12\x1b[31m ", origin_url="u" * 5000, owner=None, license=True)
    assert kept == {"record_id": "12[31m", "origin_url": "u" * common.MAX_FIELD_CHARS}
    assert common.provenance(owner="") is None
    with pytest.raises(ValueError, match="not a provenance field"):
        common.provenance(name="someone")


def test_a_parquet_row_group_too_large_to_decode_at_once_is_one_error_row_per_row(tmp_path, monkeypatch):
    from pipelines.core.readers import hf_parquet

    fixture = ff.hf_parquet(tmp_path, PHOTOS, row_group_size=4)
    meta = pq.ParquetFile(fixture.source).metadata
    sizes = [hf_parquet._column_bytes(meta.row_group(g), "image") for g in (0, 1)]
    monkeypatch.setattr(hf_parquet, "MAX_GROUP_BYTES", (sizes[0] + sizes[1]) // 2)  # between the two
    raws = read_all(spec(fixture.source), unit_size=3)
    big = 0 if sizes[0] > sizes[1] else 1
    refused = [r for r in raws if r.error and "MiB of images" in r.error]
    assert [r.source_uri for r in refused] == [f"{fixture.source}#row={big * 4 + i}" for i in range(4)]
    assert len(raws) == 8


def test_record_files_in_gcs_read_as_on_disk(tmp_path, gcs_emulator):
    from pipelines.core import storage

    bucket = gcs_emulator.make_bucket("readers")
    ms = ff.msceleb_tsv(tmp_path, PHOTOS)
    (tmp_path / "hf").mkdir()
    hf = ff.hf_parquet(tmp_path / "hf", PHOTOS, path_only=True)
    for path in [ms.source, hf.source, *(tmp_path / "hf" / "images").iterdir()]:
        storage.write_atomic(storage.join(bucket, str(path.relative_to(tmp_path))), path.read_bytes())
    for local, name in ((ms.source, "faces.tsv"), (hf.source, "hf/train.parquet")):
        remote = storage.join(bucket, name)
        want = [
            (r.source_uri.replace(str(tmp_path), bucket), r.data, r.error, r.provenance)
            for r in read_all(spec(local))
        ]
        got = [(r.source_uri, r.data, r.error, r.provenance) for r in read_all(spec(remote))]
        assert got == want and len(got) == 8


def test_a_folder_of_record_files_skips_side_files_and_refuses_links_out(tmp_path):
    (tmp_path / "set").mkdir()
    fixture = ff.msceleb_tsv(tmp_path / "set", PHOTOS)  # with mid2name.tsv beside it: 2 columns
    (tmp_path / "set" / "README.md").write_text("not records")
    units = plan_units(spec(tmp_path / "set", "msceleb-tsv"), 100)
    assert [u.items for u in units] == [(str(fixture.source),)]  # the names file is never planned
    (tmp_path / "elsewhere.tsv").write_bytes(fixture.source.read_bytes())
    (tmp_path / "set" / "link.tsv").symlink_to(tmp_path / "elsewhere.tsv")
    with pytest.raises(ConfigError, match="link.tsv: outside the data set"):
        plan_units(spec(tmp_path / "set", "msceleb-tsv"), 100)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "mid2name.tsv").write_text("m.0qz0000x\tQuillon Vextrabe@en\n")
    with pytest.raises(ConfigError, match="no file of format msceleb-tsv"):
        plan_units(spec(tmp_path / "empty", "msceleb-tsv"), 100)
