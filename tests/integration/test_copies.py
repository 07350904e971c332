"""Copies by PDQ and the look-ups by photo, URL and Flickr account, on real photos.

Three data sets on the local engine: ``flickr`` (Flickr metadata, its photos served over HTTP:
photo A as a JPEG, photo B as a PNG, and a generated scene with no face), ``ms`` (an MS-Celeb TSV
row holding A's bytes, with an image and a page URL) and ``copies``: A resized to 50%, A at JPEG
quality 50, A with 5% cropped off, B re-encoded as JPEG, the scene resized and re-encoded, and
another photo of the person in A and B. The index build groups each copy with its original and
never the person's different photos; ``lookup`` finds them; erasure and export carry the table.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from indexing import build_index, copies, erase, open_index
from indexing.export import export, verify_bundle
from pipelines.cli import app
from pipelines.commands.index import search_report
from pipelines.core.config import DatasetSpec, HttpConfig, JobConfig
from pipelines.engines.local_engine import run_job
from tests import format_fixtures as ff

LOOPBACK = ["127.0.0.0/8"]
PERSON = ("img1.jpg", "img2.jpg", "img4.jpg")  # one person (master.csv): A, B and a third photo


def encode(image: Image.Image, kind: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def scene() -> Image.Image:
    """A faceless picture: seeded shapes on a gradient (PDQ quality well above 50)."""
    rng = random.Random(7)
    image = Image.linear_gradient("L").resize((320, 240)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.randrange(300), rng.randrange(220)
        box = [x, y, x + rng.randrange(10, 80), y + rng.randrange(10, 60)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def crop(image: Image.Image, share: float) -> Image.Image:
    """``share`` of the area cut off, off centre: more from the left than the right, all from the top."""
    w, h = image.size
    side = 1 - (1 - share) ** 0.5
    return image.crop((round(w * side * 1.5), round(h * side), w - round(w * side * 0.5), h))


@pytest.fixture(scope="module")
def photos(faces_dir) -> dict[str, bytes]:
    a_bytes, b_jpeg, third = ff.small_photos([faces_dir / name for name in PERSON])
    a, b = (Image.open(io.BytesIO(x)).convert("RGB") for x in (a_bytes, b_jpeg))
    view = scene()
    return {
        "a": a_bytes,
        "b.png": encode(b, "PNG"),
        "scene.png": encode(view, "PNG"),
        "a_half.jpg": encode(a.resize((a.width // 2, a.height // 2)), quality=85),
        "a_q50.jpg": encode(a, quality=50),
        "a_crop.jpg": encode(crop(a, 0.05), quality=85),
        "b.jpg": encode(b, quality=85),
        "scene.jpg": encode(view.resize((256, 192)), quality=70),
        "same_person.jpg": third,
    }


COPIES = ("a_half.jpg", "a_q50.jpg", "a_crop.jpg", "b.jpg", "scene.jpg", "same_person.jpg")
# each copy whose photo finds its original: all but the crop (a crop holds less than the original;
# the original's photo finds the crop, see below)
ORIGINAL = {"a_half.jpg": "a", "a_q50.jpg": "a", "b.jpg": "b.png", "scene.jpg": "scene.png"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, photos):
    """(index root, flickr base URL, folder of the copies): ingested and built once."""
    root = tmp_path_factory.mktemp("copies")
    folder = root / "copies"
    folder.mkdir()
    for name in COPIES:
        (folder / name).write_bytes(photos[name])
    (root / "a.jpg").write_bytes(photos["a"])  # the person's own photo, as they would ask with it
    (root / "flickr").mkdir()
    (root / "ms").mkdir()
    served = {"0.jpg": photos["a"], "1.jpg": photos["b.png"], "2.jpg": photos["scene.png"]}
    with ff.serve_files(served) as base:
        flickr = ff.flickr_meta(root / "flickr", base, 3, "csv")
        ms = ff.msceleb_tsv(root / "ms", [photos["a"]], broken=False)
        specs = [
            DatasetSpec(name="flickr", source=str(flickr.source), format="flickr-meta"),
            DatasetSpec(name="ms", source=str(ms.source), format="msceleb-tsv"),
            DatasetSpec(name="copies", source=str(folder)),
        ]
        job = JobConfig(
            datasets=specs, out=str(root / "out"), run_id="r", progress=False,
            http=HttpConfig(allow_networks=LOOPBACK),
        )  # fmt: skip
        run = run_job(job)
    build_index([run.uri], str(root / "index"))
    return root / "index", base, folder


def lookup(index: Path, *args: str) -> list[dict]:
    result = CliRunner().invoke(app, ["lookup", "--index", str(index), *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["results"]


def shas(photos) -> dict[str, str]:
    import hashlib

    return {name: hashlib.sha256(data).hexdigest() for name, data in photos.items()}


def table(index: Path):
    idx = open_index(str(index))
    try:
        return copies.Copies.open(idx.folder, idx.manifest, idx.erased)
    finally:
        idx.close()


def test_each_copy_is_found_by_photo_and_other_photos_of_the_person_are_not(built, photos):
    index, base, folder = built
    sha = shas(photos)
    asked = [*(folder / name for name in COPIES), folder.parent / "a.jpg"]
    results = lookup(index, *[a for path in asked for a in ("--photo", str(path))])
    by_query = {Path(r["query"]).name: r for r in results}
    original = {i["image_sha256"]: i for i in by_query["a.jpg"]["images"]}
    assert original[sha["a"]]["via"] == "bytes"
    for name in ("a_half.jpg", "a_q50.jpg", "a_crop.jpg"):
        assert original[sha[name]]["via"] == "pdq" and original[sha[name]]["pdq_distance"] <= 31, name
    for name, original in ORIGINAL.items():
        found = {i["image_sha256"]: i for i in by_query[name]["images"]}
        assert found[sha[name]]["via"] == "bytes"
        assert found[sha[original]]["via"] == "pdq", name
        expected = ["copies", "flickr", "ms"] if original == "a" else ["copies", "flickr"]
        assert by_query[name]["datasets"] == expected, name
    a_copy = {i["image_sha256"]: i for i in by_query["a_q50.jpg"]["images"]}[sha["a"]]
    assert a_copy["pdq_distance"] <= 31
    where = {(o["dataset"], o["origin_url"], o["owner"], o["record_id"]) for o in a_copy["occurrences"]}
    assert ("flickr", f"{base}/0.jpg", ff.owner(0), "5550000") in where
    assert ("ms", "http://img.example.org/p0.jpg", None, "face-000000") in where
    # different photos of one person: each a group of its own
    groups = table(index)
    person = [sha["a"], sha["b.png"], sha["same_person.jpg"]]
    assert len({int(groups.groups[groups.row_of(s)]) for s in person}) == 3
    assert {i["image_sha256"] for i in by_query["same_person.jpg"]["images"]} == {sha["same_person.jpg"]}


def test_a_faceless_photo_is_found_and_the_text_output_names_no_vector(built, photos):
    index, _, folder = built
    result = CliRunner().invoke(app, ["lookup", "--index", str(index), "--photo", str(folder / "scene.jpg")])
    assert result.exit_code == 0, result.output
    assert "flickr" in result.output and "[pdq, " in result.output and "owner=" in result.output


def test_url_owner_and_flickr_photo_look_ups(built, photos):
    index, base, _ = built
    sha = shas(photos)
    # answers come URLs first, then hashes, accounts and photo ids
    by_origin, by_page, by_source, nothing, by_owner, by_photo = lookup(
        index,
        "--url", f"{base.upper().replace('HTTP://', 'http://')}/1.jpg",  # the host's case does not matter
        "--url", "http://page.example.org/a0.html",
        "--flickr-owner", ff.owner(2),
        "--flickr-photo", "5550000",
        "--url", f"{built[2]}/b.jpg",
        "--url", "http://page.example.org/nowhere",
    )  # fmt: skip
    assert by_origin["datasets"] == ["flickr"]
    direct = [i["image_sha256"] for i in by_origin["images"] if i["via"] == "url"]
    assert direct == [sha["b.png"]]
    assert sha["b.jpg"] in {i["image_sha256"] for i in by_origin["images"]}  # its copy, with it
    assert by_page["datasets"] == ["ms"]
    assert [i["image_sha256"] for i in by_page["images"] if i["via"] == "url"] == [sha["a"]]
    assert [i["image_sha256"] for i in by_owner["images"] if i["via"] == "owner"] == [sha["scene.png"]]
    assert [i["image_sha256"] for i in by_photo["images"] if i["via"] == "photo_id"] == [sha["a"]]
    assert by_source["found"] and by_source["datasets"] == ["copies"]
    assert not nothing["found"] and nothing["images"] == []


def test_search_says_how_many_copies_of_each_hit_exist(built, photos, tmp_path):
    index, _, folder = built
    idx = open_index(str(index))
    try:
        report = search_report(idx, [folder.parent / "a.jpg"], 10, None, None)
    finally:
        idx.close()
    sha = shas(photos)
    (face,) = report["photos"][0]["faces"]
    hit = next(m for m in face["matches"] if m["image_sha256"] == sha["a"])
    # A: in flickr and ms; its copies a_half and a_q50 in copies. The build groups by PDQ alone, so
    # the cropped copy (more bits away than the threshold) is not counted: only a photo's look-up
    # tries crops
    assert hit["copies"] == {"occurrences": 4, "datasets": {"copies": 2, "flickr": 1, "ms": 1}}


def test_range_look_up_covers_origin_and_page_urls_of_faceless_images(built, photos):
    from indexing.lookup import RangeTables, url_hash

    index, base, _ = built
    idx = open_index(str(index))
    try:
        tables = RangeTables.open(idx.folder, idx.manifest)
        scene_url = tables.find(url_hash(f"{base}/2.jpg"))  # the scene: no face
        page = tables.find(url_hash("http://page.example.org/a0.html"))
        scene_bytes = tables.find(shas(photos)["scene.png"])
    finally:
        idx.close()
    assert scene_url.datasets == ["flickr"] and page.datasets == ["ms"] and scene_bytes.datasets == ["flickr"]


def test_the_service_range_look_up_answers_for_a_faceless_image_url(built):
    from indexing.lookup import url_hash
    from tests.serve_helpers import running, serve_config

    index, base, _ = built
    wanted = url_hash(f"{base}/2.jpg")  # the scene's origin_url: no face, so only the copies table has it
    with running(serve_config(index)) as (client, _):
        answer = client.get(f"/v1/source/range/{wanted[:5]}")
    assert answer.status_code == 200, answer.text
    assert {"suffix": wanted[5:], "datasets": ["flickr"]} in answer.json()["matches"]


# last in the module: it erases from the module's index
def test_erasure_takes_an_image_out_of_the_copies_table_and_exports(built, photos, tmp_path):
    index, _, folder = built
    sha = shas(photos)
    gone = sha["scene.png"]  # a faceless image, erased whole
    report = erase.erase(str(index), [], whole_images=[gone])
    idx = open_index(str(index))
    try:
        entry = idx.manifest["copies"]
        assert ".e" in entry["table"]["file"] and entry["table"]["rows"] == len(set(sha.values())) - 1
        left = pq.read_table(Path(idx.folder) / entry["table"]["file"]).column("image_sha256").to_pylist()
    finally:
        idx.close()
    assert gone not in left and sha["scene.jpg"] in left and report.entry
    (result,) = lookup(index, "--photo", str(folder / "scene.jpg"))
    assert [i["image_sha256"] for i in result["images"]] == [sha["scene.jpg"]]
    assert result["datasets"] == ["copies"]
    exported = tmp_path / "export"
    export(str(index), str(exported))
    _, manifest = verify_bundle(str(exported))
    assert manifest["copies"]["table"]["sha256"] == entry["table"]["sha256"]
    (again,) = lookup(exported, "--flickr-owner", ff.owner(2))
    assert not again["found"]


def test_the_person_photos_of_the_test_set_are_never_copies(faces_run, faces_dir):
    """All 64 photos (several of each person): no two different photos share a group."""
    from indexing.runs import find_runs
    from pipelines.core import erasure

    grouped = copies.copies_table(copies.image_rows(find_runs([faces_run.uri]), erasure.EMPTY))
    assert grouped.num_rows >= 60
    assert len(set(grouped.column("group").to_pylist())) == grouped.num_rows
    with open(faces_dir / "master.csv") as f:
        assert any(row["Decision"] == "Yes" for row in csv.DictReader(f))  # the set holds such pairs
