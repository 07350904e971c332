"""``faceaudit erase``: list a person's faces, confirm, erase."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from indexing import signing
from indexing.erase import Found, Report, erase, find_by_ids, find_by_photos, index_root
from indexing.search import open_index
from pipelines.core import erasure
from pipelines.core.errors import FaceauditError

from .common import err, fail, out


def erase_command(
    index: Annotated[str, typer.Option("--index", help="index root (uses CURRENT) or a version folder")],
    photo: Annotated[
        list[str] | None,
        typer.Option(
            "--photo", help="a photo of the person: every indexed face matching it is erased; repeatable"
        ),
    ] = None,
    face_id: Annotated[
        list[int] | None, typer.Option("--face-id", help="erase this face_id; repeatable")
    ] = None,
    image_sha256: Annotated[
        list[str] | None, typer.Option("--image-sha256", help="erase every face of this image; repeatable")
    ] = None,
    source_uri: Annotated[
        list[str] | None,
        typer.Option("--source-uri", help="erase every face of the image found at this URI; repeatable"),
    ] = None,
    export: Annotated[
        list[str] | None,
        typer.Option(
            "--export", help="an export (bundle root or version folder) to erase from too; repeatable"
        ),
    ] = None,
    cache_dir: Annotated[
        list[str] | None,
        typer.Option(
            "--cache-dir", help="a bundle download cache to purge (the default one always is); repeatable"
        ),
    ] = None,
    erasure_log: Annotated[
        str | None, typer.Option(help="the erasure log (default: <index>/_erasure)")
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(help="cosine similarity for a match (default: the model's calibrated threshold)"),
    ] = None,
    public_key: Annotated[
        str | None,
        typer.Option(help="refuse an index not signed by this Ed25519 public key (or FACEAUDIT_PUBLIC_KEY)"),
    ] = None,
    signing_key: Annotated[
        str | None,
        typer.Option(help="re-sign the manifests the erasure rewrites (or FACEAUDIT_SIGNING_KEY)"),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="erase without asking")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print what was done as JSON")] = False,
) -> None:
    """Erase a person's faces from the index, the runs it was built from, exports and caches.

    The faces are listed first (data set, source URI, box, score) and erased once confirmed. Their
    salted hashes go to an append-only erasure log that every later ingest, index build, search and
    export honours. Run it again after an interruption: it finishes what was left."""
    log = erasure_log or erasure.default_log(index_root(index))
    try:
        key = signing.signing_key(signing_key)  # a bad key file fails before anything is done
        idx = open_index(index, erasure_log=log, public_key=public_key)
        found = find_by_photos(idx, photo) if photo else []
        by_id, whole = find_by_ids(idx, face_id or [], image_sha256 or [], source_uri or [])
        idx.close()
    except FaceauditError as exc:
        fail(exc)
    targets = {f.face_id: f for f in [*by_id, *found]}
    listed = sorted(targets.values(), key=lambda f: (-(f.score or 0), f.face_id))
    if photo and not found:
        err.print("no indexed face matches the photo(s) (faces erased before are never shown)")
    if source_uri and not whole:
        err.print("no indexed image occurs at the given source URI(s)")
    if listed:
        print_found(listed)
    new_ids = set(face_id or []) | set(targets)
    if (new_ids or whole) and not yes and not typer.confirm(f"erase these {len(new_ids)} face(s)?"):
        raise typer.Exit(1)
    if not new_ids and not whole:
        err.print("nothing new to erase; finishing any earlier erasure that was interrupted")
    try:
        with signing.signing_with(key):
            report = erase(index, listed, face_id or [], whole, log, export or [], cache_dir or [])
    except FaceauditError as exc:
        fail(exc)
    print_report(report, as_json)


def print_found(found: list[Found]) -> None:
    table = Table("score", "data set", "box", "face_id")
    table.add_column("source", overflow="fold")
    for f in found:
        box = ", ".join(f"{v:.0f}" for v in f.bbox)
        score = "-" if f.score is None else f"{f.score:.3f}"
        for occ in f.occurrences:
            table.add_row(score, occ["dataset"], box, str(f.face_id), occ["source_uri"])
    out.print(f"{len(found)} face(s) in {len({f.image_sha256 for f in found})} image(s):")
    out.print(table)


def print_report(report: Report, as_json: bool) -> None:
    if as_json:
        json.dump(asdict(report), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    removed = sum(report.bundle_faces_removed.values())
    out.print(
        f"erased: {report.run_faces_removed} face row(s) from {report.run_shards_rewritten} run "
        f"shard(s) in {len(report.runs_updated)} run(s); {removed} face(s) from "
        f"{len(report.bundle_faces_removed)} index version(s) or export(s); {report.files_deleted} old "
        f"file(s) and {report.noncurrent_deleted} noncurrent object version(s) deleted; "
        f"{len(report.caches_removed)} cached copy(ies) removed"
    )
