"""``faceaudit datasets list``: the known data sets and what an index covers (``indexing.coverage``)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from indexing.coverage import Coverage, coverage
from pipelines.core.catalog import DEFAULT_REGISTRIES
from pipelines.core.errors import FaceauditError

from .common import fail, out

datasets_app = typer.Typer(
    help="The data sets faceaudit knows of, and which an index covers.", no_args_is_help=True
)


@datasets_app.command("list")
def list_datasets(
    registry: Annotated[
        list[str] | None,
        typer.Option(
            metavar="DIR",
            help="registry folder (local or gs://); repeatable or comma-separated, the catalogue "
            "first: a later folder's entry of the same name wins. Default: "
            + " and ".join(DEFAULT_REGISTRIES),
        ),
    ] = None,
    index: Annotated[
        str | None,
        typer.Option(help="index root (or a version folder): show what its CURRENT version covers"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False,
) -> None:
    """List every known data set with its status, licence and format, and with --index whether
    the index's current version covers it (its images and faces there)."""
    try:
        result = coverage(registry or list(DEFAULT_REGISTRIES), index)
    except FaceauditError as exc:
        fail(exc, 2)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    out.print(table(result))
    out.print(summary(result))


def table(result: Coverage) -> Table:
    title = "data sets"
    if result.index is not None:
        title = f"data sets in {result.index} (version {result.index_version})"
    table = Table(title=escape(title))
    table.add_column("data set", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("licence", overflow="fold", max_width=40)
    table.add_column("format", no_wrap=True)
    if result.index is not None:
        for column in ("covered", "images", "faces"):
            table.add_column(column, justify="left" if column == "covered" else "right", no_wrap=True)
    for d in result.datasets:
        row = [
            escape(d.name),
            escape(d.status or "-"),
            escape(d.license or "-"),
            escape(d.format or "-"),
        ]
        if result.index is not None:
            row += [covered_cell(d), *(str(n) if d.indexed else "-" for n in _counts(d))]
        table.add_row(*row)
    return table


def covered_cell(d) -> str:
    if d.indexed is None:
        return "no"
    held = d.indexed.version
    if not d.in_registry:
        return "yes (in no registry" + (f"; version {escape(held)})" if held else ")")
    if d.same_version:
        return "yes"
    return f"yes (version {escape(held or 'none')}; the registry's: {escape(d.version or 'none')})"


def _counts(d) -> tuple[int, int]:
    return (d.indexed.images, d.indexed.faces) if d.indexed else (0, 0)


def summary(result: Coverage) -> str:
    known = [d for d in result.datasets if d.in_registry]
    line = f"{len(known)} data set(s) in {', '.join(result.registries)}"
    if result.index is not None:
        covered = sum(1 for d in known if d.covered)
        line += f"; the index covers {covered} of them (version {result.index_version})"
        extra = len(result.datasets) - len(known)
        if extra:
            line += f" and {extra} data set(s) no registry describes"
    return escape(line)
