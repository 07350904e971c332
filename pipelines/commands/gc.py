"""``faceaudit gc``: delete what crashed runs and index builds left behind (``indexing.gc``)."""

from __future__ import annotations

from typing import Annotated

import typer

from indexing.gc import DEFAULT_OLDER_THAN, delete, find_orphans, parse_duration


def gc(
    uri: Annotated[str, typer.Argument(help="an <out> root, a run folder or an index root (local or gs://)")],
    older_than: Annotated[
        str,
        typer.Option(
            help="leave alone whatever changed more recently (30m, 6h, 2d; 0: nothing is in progress)"
        ),
    ] = DEFAULT_OLDER_THAN,
    dry_run: Annotated[bool, typer.Option(help="list what would be deleted; delete nothing")] = False,
) -> None:
    """Delete temporary files, shards no manifest lists, abandoned runs and unpublished index builds.

    Never deletes what a committed manifest lists, a manifest, or the version CURRENT names. Prints
    each path and its size, never its contents."""
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    found = find_orphans(uri, seconds)
    if not dry_run:
        delete(found)
    verb = "would delete" if dry_run else "deleted"
    for orphan in found:
        typer.echo(f"{verb} {orphan.uri} ({orphan.bytes} bytes): {orphan.why}")
    total = sum(o.bytes for o in found)
    typer.echo(f"{verb} {len(found)} file(s), {total} bytes, under {uri}")
