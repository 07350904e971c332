"""Registries in layers: the catalogue of known data sets under an operator's own registry.

A registry is a folder of data set YAMLs (``load_registry``); the catalogue
(``configs/datasets/catalog/``) is one in the same format whose entries may have no source. Several
folders are read in order and an entry of a later folder replaces an entry of the same name from
an earlier one; the last folder is the operator's registry, every earlier one a catalogue. So an
operator who holds a copy of a withdrawn data set audits it by giving it, under the catalogue's
name, a source of their own.

What may be fetched (``skip_reason``): never an entry without a source, and never a catalogue
entry whose status is ``withdrawn`` (its publisher's address, if any, no longer serves it); an
entry of the operator's registry with a source is always theirs to ingest.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import storage
from .config import DatasetSpec, load_registry
from .errors import ConfigError

CATALOG = "configs/datasets/catalog"
DEFAULT_REGISTRIES = (CATALOG, "configs/datasets")  # what `faceaudit datasets list` reads by default


@dataclass(frozen=True, slots=True)
class Entry:
    """One data set as the layers give it: its spec and the folder it came from."""

    spec: DatasetSpec
    folder: str
    operator: bool  # from the last folder (the operator's registry), not from a catalogue
    overrides: str | None = None  # the earlier folder whose entry of this name it replaces

    @property
    def name(self) -> str:
        return self.spec.name


def split_folders(value: str | Sequence[str]) -> list[str]:
    """Registry folders from a comma-separated string or a list of them (each may hold commas)."""
    values = [value] if isinstance(value, str) else list(value)
    folders = [part.strip() for v in values for part in v.split(",")]
    return [f for f in folders if f]


def load_layers(
    folders: str | Sequence[str],
    read: Callable[[str], dict[str, DatasetSpec]] | None = None,
) -> dict[str, Entry]:
    """Every entry of the layered registries by name, later folders winning. Each folder is read
    by ``read`` (default ``read_folder``: ``load_registry``, the same validation and errors for
    every folder, catalogue or not)."""
    names = split_folders(folders)
    if not names:
        raise ConfigError("no registry folder given")
    read = read or read_folder
    entries: dict[str, Entry] = {}
    for i, folder in enumerate(names):
        operator = i == len(names) - 1
        for name, spec in read(folder).items():
            before = entries.get(name)
            entries[name] = Entry(spec, folder, operator, before.folder if before else None)
    return dict(sorted(entries.items()))


def skip_reason(entry: Entry) -> str | None:
    """Why a rebuild must not fetch ``entry`` (None: it may). Removed entries are not asked."""
    spec = entry.spec
    if spec.source is None:
        status = "" if spec.status == "available" else f"status {spec.status}, "
        return f"{status}no source ({spec.no_source_reason()})"
    if spec.status == "withdrawn" and not entry.operator:
        return f"status withdrawn in the catalogue {entry.folder}; its source {spec.source} is not fetched"
    return None


def skip_message(entry: Entry) -> str:
    return (
        f"data set {entry.name!r} skipped: {skip_reason(entry)}. To audit a copy you hold, give it "
        "a source of your own in your registry under the same name"
    )


def read_folder(uri: str) -> dict[str, DatasetSpec]:
    """``load_registry`` of a folder: a local one, which must exist, or gs:// (its YAMLs copied to
    a temporary folder first)."""
    if storage.is_local(uri):
        path = storage.url_to_fs(uri)[1]
        if not os.path.isdir(path):
            raise ConfigError(f"registry folder {uri} does not exist")
        return load_registry(path)
    with tempfile.TemporaryDirectory(prefix="faceaudit-registry-") as tmp:
        for name in storage.listdir(uri):
            if name.endswith((".yaml", ".yml")):
                storage.download(storage.join(uri, name), os.path.join(tmp, name))
        return load_registry(tmp)


# ---------------------------------------------------------------- the README's table

WITHDRAWN = re.compile(r"Withdrawn: (\d{4}(?:-\d{2}){0,2}|date unknown)")
TABLE_START = "<!-- catalog-table:start (bench/catalog_table.py writes this table; edit the YAMLs) -->"
TABLE_END = "<!-- catalog-table:end -->"


def withdrawn_on(spec: DatasetSpec) -> str | None:
    """The withdrawal date a catalogue description records ("Withdrawn: 2019-06 ..."), if any."""
    match = WITHDRAWN.search(" ".join(spec.description.split()))
    return match.group(1) if match else None


def markdown_table(specs: Sequence[DatasetSpec]) -> str:
    """The catalogue as a Markdown table, one row per data set in name order."""

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    rows = [
        "| data set | version | status | licence | format | source |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec in sorted(specs, key=lambda s: s.name):
        status = spec.status
        if status == "withdrawn":
            status += f" ({withdrawn_on(spec) or 'date unknown'})"
        source = f"`{spec.source}`" if spec.source else "none"
        rows.append(
            f"| {cell(spec.name)} | {cell(spec.version or '-')} | {cell(status)} | {cell(spec.license)} "
            f"| {cell(spec.format)} | {cell(source)} |"
        )
    return "\n".join(rows) + "\n"


def replace_table(text: str, table: str) -> str:
    """``text`` with what lies between the table markers replaced by ``table``."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {TABLE_START!r} and {TABLE_END!r} are missing")
    head = text[: start + len(TABLE_START)]
    return f"{head}\n{table}{text[end:]}"


def table_in(text: str) -> str:
    """The table between the markers of ``text``."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {TABLE_START!r} and {TABLE_END!r} are missing")
    return text[start + len(TABLE_START) : end].lstrip("\n")
