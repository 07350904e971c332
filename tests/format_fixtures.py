"""Data set files in the published layouts, generated from the test photos: an MS-Celeb-1M TSV
(base64 crops and rectangles, Freebase MIDs) with its MID -> name file, a Hugging Face Parquet
(an image struct and a ``name`` column; a path-only variant), and Flickr metadata (CSV and JSONL,
with owners and licences) whose photos a local HTTP server serves.

Every builder returns a ``Fixture``: the file to ingest, the identity labels it carries (which no
output may hold), the records that must read and the broken ones with the reason each must give.
The labels are invented, distinctive strings, never a real person's name.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# Invented labels: unlikely to occur anywhere by chance, so finding one in an output is a leak.
NAMES = ("Quillon Vextrabe", "Ormsa Tindlewick", "Pellagra Nooth", "Zebedai Crumhorn")


@dataclass
class Fixture:
    source: Path
    labels: list[str] = field(default_factory=list)
    # source_uri -> the provenance its images row must carry (None where it has none)
    good: dict[str, dict | None] = field(default_factory=dict)
    # source_uri -> a piece of the reason its error row must give (stage "read")
    broken: dict[str, str] = field(default_factory=dict)


def small_photos(photos: list[Path], side: int = 320, quality: int = 85) -> list[bytes]:
    """JPEG bytes of ``photos`` downscaled to at most ``side`` px, so runs take seconds."""
    out = []
    for path in photos:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
            out.append(buf.getvalue())
    return out


def mid(i: int) -> str:
    return f"m.0qz{i:04d}x"


def row_uri(source: Path, row: int) -> str:
    return f"{source}#row={row}"


def msceleb_line(i: int, photo: bytes) -> bytes:
    """One MS-Celeb row: MID, rank, image URL, page URL, face id, rectangle, crop (base64)."""
    rect = base64.b64encode(struct.pack("<4f", 0.1, 0.2, 0.6, 0.7))
    fields = [
        mid(i % len(NAMES)).encode(),
        str(i % 7).encode(),
        f"http://img.example.org/p{i}.jpg".encode(),
        f"http://page.example.org/a{i}.html".encode(),
        f"face-{i:06d}".encode(),
        rect,
        base64.b64encode(photo),
    ]
    return b"\t".join(fields) + b"\n"


def msceleb_tsv(folder: Path, photos: list[bytes], broken: bool = True) -> Fixture:
    """``folder/faces.tsv`` and ``folder/mid2name.tsv`` (MID -> name, as the data set ships it)."""
    source = folder / "faces.tsv"
    fixture = Fixture(source, labels=[mid(i) for i in range(len(NAMES))] + list(NAMES))
    rows = [msceleb_line(i, photo) for i, photo in enumerate(photos)]
    for i in range(len(photos)):
        fixture.good[row_uri(source, i)] = {
            "record_id": f"face-{i:06d}",
            "origin_url": f"http://img.example.org/p{i}.jpg",
            "page_url": f"http://page.example.org/a{i}.html",
        }
    if broken:
        n = len(rows)
        bad_b64 = msceleb_line(n, photos[0]).rsplit(b"\t", 1)[0] + b"\t!!not*base64!!\n"
        truncated = b"\t".join(msceleb_line(n + 1, photos[0]).split(b"\t")[:4]) + b"\n"
        rows += [bad_b64, truncated]
        fixture.broken[row_uri(source, n)] = "not valid base64"
        fixture.broken[row_uri(source, n + 1)] = "4 of 7 columns"
        # the file ends inside a row: a crop cut to 4k+1 base64 characters (never valid), no newline
        head, crop = msceleb_line(n + 2, photos[-1]).rstrip(b"\n").rsplit(b"\t", 1)
        half = len(crop) // 2
        rows.append(head + b"\t" + crop[: half - half % 4 + 1])
        fixture.broken[row_uri(source, n + 2)] = "not valid base64"
    source.write_bytes(b"".join(rows))
    (folder / "mid2name.tsv").write_text("".join(f"{mid(i)}\t{name}@en\n" for i, name in enumerate(NAMES)))
    return fixture


def hf_parquet(
    folder: Path, photos: list[bytes], path_only: bool = False, row_group_size: int = 4
) -> Fixture:
    """``folder/train.parquet``: an ``image`` struct (bytes and path, or only a path to a file in
    ``folder/images``), an ``id``, and the label columns ``name`` and ``label`` (identity)."""
    source = folder / "train.parquet"
    fixture = Fixture(source, labels=list(NAMES))
    images, ids, names = [], [], []
    if path_only:
        (folder / "images").mkdir(exist_ok=True)
    for i, photo in enumerate(photos):
        name = f"images/{i:04d}.jpg"
        if path_only:
            (folder / name).write_bytes(photo)
        images.append({"bytes": None if path_only else photo, "path": name})
        ids.append(f"rec-{i}")
        names.append(NAMES[i % len(NAMES)])
        fixture.good[row_uri(source, i)] = {"record_id": f"rec-{i}"}
    n = len(photos)
    bad = [
        ({"bytes": None, "path": None}, "neither bytes nor a path"),
        ({"bytes": None, "path": "../../outside.jpg"}, "outside the data set"),
        ({"bytes": None, "path": "images/missing.jpg"}, "file not found"),
    ]
    for j, (image, reason) in enumerate(bad):
        images.append(image)
        ids.append(f"rec-{n + j}")
        names.append(NAMES[j % len(NAMES)])
        fixture.broken[row_uri(source, n + j)] = reason
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(images, struct_type),
            "id": ids,
            "name": names,
            "label": [i % len(NAMES) for i in range(len(names))],
        }
    )
    pq.write_table(table, source, row_group_size=row_group_size)
    return fixture


FLICKR_COLUMNS = ("photo_id", "url", "owner", "license", "username", "title")


def owner(i: int) -> str:
    return f"{10000 + i % 3}@N0{i % 3}"


def flickr_meta(folder: Path, base_url: str, n: int, kind: str = "csv") -> Fixture:
    """``folder/meta.csv`` or ``meta.jsonl``: photos ``<base_url>/<i>.jpg`` (i < n) with a photo
    id, an owner NSID, a licence, and a ``username`` and ``title`` that are never kept."""
    source = folder / f"meta.{kind}"
    fixture = Fixture(source, labels=list(NAMES))
    records = []
    for i in range(n):
        records.append(
            {
                "photo_id": str(5550000 + i),
                "url": f"{base_url}/{i}.jpg",
                "owner": owner(i),
                "license": "CC BY 2.0" if i % 2 else "CC BY-NC 2.0",
                "username": NAMES[i % len(NAMES)],
                "title": f"{NAMES[(i + 1) % len(NAMES)]} at the beach",
            }
        )
        fixture.good[row_uri(source, i)] = {
            "record_id": str(5550000 + i),
            "origin_url": f"{base_url}/{i}.jpg",
            "owner": owner(i),
            "license": records[-1]["license"],
        }
    gone = dict(records[0], photo_id="5559999", url=f"{base_url}/gone.jpg")
    if kind == "csv":
        lines = [",".join(FLICKR_COLUMNS)]
        lines += [_csv_line([r[c] for c in FLICKR_COLUMNS]) for r in [*records, gone]]
        lines.append("5559998,")  # a truncated row
        lines.append('5559997,"http://unterminated')  # broken quoting
        source.write_text("\n".join(lines) + "\n")
    else:
        lines = [json.dumps(r) for r in [*records, gone]]
        broken_json, wrong_type = '{"photo_id": "5559998", "url": ', json.dumps(dict(records[0], url=12345))
        lines += [broken_json, wrong_type, '{"photo_id": "1"}']
        source.write_text("\n".join(lines) + "\n")
    fixture.broken[row_uri(source, n)] = "404"
    if kind == "csv":
        fixture.broken[row_uri(source, n + 1)] = "truncated row"
        fixture.broken[row_uri(source, n + 2)] = "broken quoting"
    else:
        fixture.broken[row_uri(source, n + 1)] = "broken JSON"
        fixture.broken[row_uri(source, n + 2)] = "not a string"
        fixture.broken[row_uri(source, n + 3)] = "no URL"
    return fixture


def _csv_line(values: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()


@contextlib.contextmanager
def serve_files(files: dict[str, bytes]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering ``/<name>`` with ``files[name]`` (404 otherwise);
    yields its base URL. Fetching from it needs ``http.allow_networks: [127.0.0.0/8]``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server name)
            body = files.get(self.path.lstrip("/"))
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "image/jpeg" if body is not None else "text/plain")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_msceleb_rows(path: Path, rows: int, photos: list[bytes]) -> None:
    """A big MS-Celeb-layout TSV (the bench's): ``rows`` rows cycling over ``photos``, written
    as a stream."""
    with open(path, "wb") as f:
        for i in range(rows):
            f.write(msceleb_line(i, photos[i % len(photos)]))
