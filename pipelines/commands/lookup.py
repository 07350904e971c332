"""``faceaudit lookup``: the range look-up's answers for operators, from the command line."""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Annotated

import typer

from indexing.errors import QueryError
from indexing.lookup import RangeTables, url_hash
from indexing.search import open_index
from pipelines.core.errors import FaceauditError
from pipelines.core.sources import read_bounded

from .common import fail, out

MAX_PHOTO = 64 << 20


def lookup(
    index: Annotated[str, typer.Option("--index", help="index root (uses CURRENT) or a version folder")],
    url: Annotated[
        list[str] | None, typer.Option("--url", help="a source URL (normalised, then hashed); repeatable")
    ] = None,
    sha256: Annotated[
        list[str] | None, typer.Option("--sha256", help="SHA-256 (hex) of an image's bytes; repeatable")
    ] = None,
    photo: Annotated[
        list[str] | None, typer.Option("--photo", help="an image file whose bytes are hashed; repeatable")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False,
    public_key: Annotated[
        str | None, typer.Option("--public-key", help="refuse an index not signed by this key")
    ] = None,
) -> None:
    """Which data sets hold a source URL or an image's exact bytes (the service's range look-up)."""
    asked: list[tuple[str, str]] = [(u, url_hash(u)) for u in url or []]
    asked += [(s, s.lower()) for s in sha256 or []]
    try:
        for p in photo or []:
            asked.append((p, hashlib.sha256(read_bounded(p, MAX_PHOTO, 30.0)).hexdigest()))
    except FaceauditError as exc:  # RecordError: not a regular file, too large, unreadable
        fail(exc, 2)
    if not asked:
        fail(QueryError("give --url, --sha256 or --photo"), 2)
    try:
        idx = open_index(index, public_key=public_key)
        tables = RangeTables.open(idx.folder, idx.manifest)
        if not tables.available:
            raise QueryError(f"index version {idx.manifest['version']} has no range tables; rebuild it")
        rows = []
        for what, sha in asked:
            found = tables.find(sha, idx.erased)
            rows.append(
                {
                    "query": what,
                    "sha256": sha,
                    "found": found is not None,
                    "kind": found.kind if found else None,
                    "datasets": found.datasets if found else [],
                }
            )
        version = idx.manifest["version"]
        idx.close()
    except FaceauditError as exc:
        fail(exc, 2)
    if as_json:
        json.dump({"index_version": version, "results": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    for r in rows:
        where = ", ".join(r["datasets"]) if r["found"] else "not found"
        out.print(f"{r['query']}: {where}", soft_wrap=True, markup=False)
