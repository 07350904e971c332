"""``faceaudit lookup``: where a photo, a URL or a Flickr account or photo occurs, for operators and
for people who know their photo's address but not whether a face in it was detected.

Two tables answer it. The range tables (``indexing/lookup.py``, the service's k-anonymous look-up)
know the hashes of images and source URLs; the copies table (``indexing/copies.py``, bundles built
since it exists) knows every image the runs hold, faces or not, with its provenance and its
near-duplicates by PDQ. The output names data set, version, source_uri and the provenance columns,
never a person.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Annotated

import typer

from indexing.copies import Copies, Found
from indexing.errors import QueryError
from indexing.lookup import RangeTables, url_hash
from indexing.photos import IsolatedDecoder
from indexing.search import Index, open_index
from pipelines.core import pdq
from pipelines.core.errors import FaceauditError
from pipelines.core.sources import read_bounded

from .common import fail, out

MAX_PHOTO = 64 << 20
PROVENANCE = ("record_id", "origin_url", "page_url", "owner", "license")


def lookup(
    index: Annotated[str, typer.Option("--index", help="index root (uses CURRENT) or a version folder")],
    url: Annotated[
        list[str] | None,
        typer.Option("--url", help="a URL: source_uri, origin_url or page_url (normalised); repeatable"),
    ] = None,
    sha256: Annotated[
        list[str] | None, typer.Option("--sha256", help="SHA-256 (hex) of an image's bytes; repeatable")
    ] = None,
    photo: Annotated[
        list[str] | None,
        typer.Option("--photo", help="an image file: its bytes, and its copies by PDQ; repeatable"),
    ] = None,
    flickr_owner: Annotated[
        list[str] | None, typer.Option("--flickr-owner", help="a Flickr account's NSID; repeatable")
    ] = None,
    flickr_photo: Annotated[
        list[str] | None, typer.Option("--flickr-photo", help="a Flickr photo id; repeatable")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False,
    public_key: Annotated[
        str | None, typer.Option("--public-key", help="refuse an index not signed by this key")
    ] = None,
) -> None:
    """Which data sets hold a photo (its bytes or a re-encoded copy), a URL, or a Flickr account's
    or photo's images; with each occurrence's data set, version, source and provenance."""
    photos: list[tuple[str, bytes]] = []
    try:
        photos = [(p, read_bounded(p, MAX_PHOTO, 30.0)) for p in photo or []]
    except FaceauditError as exc:  # RecordError: not a regular file, too large, unreadable
        fail(exc, 2)
    asked = [("url", u) for u in url or []] + [("sha256", s) for s in sha256 or []]
    asked += [("flickr_owner", o) for o in flickr_owner or []] + [
        ("flickr_photo", p) for p in flickr_photo or []
    ]
    if not asked and not photos:
        fail(QueryError("give --url, --sha256, --photo, --flickr-owner or --flickr-photo"), 2)
    try:
        idx = open_index(index, public_key=public_key)
        try:
            rows = answer(idx, asked, photos)
            version = idx.manifest["version"]
        finally:
            idx.close()
    except FaceauditError as exc:
        fail(exc, 2)
    if as_json:
        json.dump({"index_version": version, "results": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print_rows(rows)


def answer(idx: Index, asked: list[tuple[str, str]], photos: list[tuple[str, bytes]]) -> list[dict]:
    """One result per question: URLs, hashes, accounts and photo ids in that order, photos last."""
    tables = RangeTables.open(idx.folder, idx.manifest)
    copies = Copies.open(idx.folder, idx.manifest, idx.erased)
    if not tables.available and copies is None:
        raise QueryError(f"index version {idx.manifest['version']} has no look-up tables; rebuild it")
    rows = []
    for kind, value in asked:
        if kind in ("flickr_owner", "flickr_photo") and copies is None:
            raise QueryError(f"index version {idx.manifest['version']} has no copies table; rebuild it")
        sha = url_hash(value) if kind == "url" else value.lower() if kind == "sha256" else None
        images = ask_copies(copies, kind, value) if copies is not None else []
        rows.append(result(value, sha, tables, idx, images))
    if photos:
        decode = IsolatedDecoder(idx)
        try:
            for name, data in photos:
                image, pixels = decode(data)  # ingest's decode, isolated: its PDQ hash and quality
                sha = hashlib.sha256(data).hexdigest()
                hashes = [(image.pdq, image.pdq_quality)]
                hashes += pdq.hash_crops(pixels.pixels) if pixels is not None else []
                del pixels  # no longer than the hashes need them
                images = copies.by_photo(sha, hashes) if copies is not None else []
                rows.append(result(name, sha, tables, idx, images, image.error))
        finally:
            decode.close()
    return rows


def ask_copies(copies: Copies, kind: str, value: str) -> list[Found]:
    if kind == "url":
        return copies.by_url(value)
    if kind == "sha256":
        return copies.by_photo(value.lower(), [])
    if kind == "flickr_owner":
        return copies.by_owner(value)
    return copies.by_flickr_photo(value)


def result(
    query: str,
    sha: str | None,
    tables: RangeTables,
    idx: Index,
    images: list[Found],
    error: str | None = None,
) -> dict:
    """The JSON of one answer: found, the data sets of what matched directly, and every image
    found with its copies and their occurrences."""
    match = tables.find(sha, idx.erased) if sha and tables.available else None
    datasets = set(match.datasets if match else [])
    datasets.update(name for f in images for name in f.matched)
    row = {
        "query": query,
        "sha256": sha,
        "found": bool(datasets),
        "kind": match.kind if match else None,
        "datasets": sorted(datasets),
        "images": [image_dict(f) for f in images],
    }
    if error:
        row["decode_error"] = error  # the photo did not decode: only its exact bytes were looked for
    return row


def image_dict(found: Found) -> dict:
    return {
        "image_sha256": found.image_sha256,
        "group": found.group,
        "via": found.via,
        "pdq_distance": found.distance,
        "occurrences": [
            {k: o.get(k) for k in ("dataset", "version", "source_uri", *PROVENANCE)}
            for o in found.occurrences
        ],
    }


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        where = ", ".join(r["datasets"]) if r["found"] else "not found"
        out.print(f"{r['query']}: {where}", soft_wrap=True, markup=False)
        for image in r["images"]:
            how = image["via"] + (
                f", {image['pdq_distance']} bits" if image["pdq_distance"] is not None else ""
            )
            for o in image["occurrences"]:
                extra = "  ".join(f"{k}={o[k]}" for k in PROVENANCE if o.get(k))
                where = " ".join(part for part in (o["dataset"], o["version"]) if part)
                line = f"  [{how}] {where}: {o['source_uri']}  {extra}".rstrip()
                out.print(line, soft_wrap=True, markup=False)
