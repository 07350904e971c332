"""Which known data sets an index covers: the catalogue and registries against the CURRENT version.

``faceaudit datasets list`` prints what ``coverage`` returns. A data set is covered when the
manifest of the version ``CURRENT`` names lists it in ``datasets`` (name, version, fingerprint,
images, faces); ``same_version`` says whether it holds the version the registry describes. Data sets
the index holds that no registry describes are listed too (``in_registry`` False).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from pipelines.core import catalog, storage

from . import bundle


@dataclass(frozen=True, slots=True)
class Indexed:
    """One ``datasets`` entry of an index manifest."""

    name: str
    version: str
    fingerprint: str | None
    images: int
    faces: int


@dataclass(frozen=True, slots=True)
class DatasetCoverage:
    """One data set: what the registries say of it and, with an index, what the index holds."""

    name: str
    version: str | None  # the registry's (None: only the index knows it)
    status: str | None
    license: str | None
    format: str | None
    source: str | None
    registry: str | None  # the folder its entry comes from
    in_registry: bool
    indexed: Indexed | None = None  # None: the index does not cover it (or no index was given)

    @property
    def covered(self) -> bool:
        return self.indexed is not None

    @property
    def same_version(self) -> bool | None:
        """Whether the index holds the registry's version (None when not covered or not described)."""
        if self.indexed is None or self.version is None:
            return None
        return self.indexed.version == self.version


@dataclass(frozen=True, slots=True)
class Coverage:
    registries: tuple[str, ...]
    datasets: list[DatasetCoverage]
    index: str | None = None
    index_version: str | None = None
    created_at: str | None = None
    model_id: str | None = None

    def to_json(self) -> dict:
        """Plain data for ``--json``: every field, ``covered`` and ``same_version`` included."""
        rows = []
        for d in self.datasets:
            row = asdict(d)
            row["covered"] = d.covered if self.index else None
            row["same_version"] = d.same_version
            rows.append(row)
        return {
            "registries": list(self.registries),
            "index": self.index,
            "index_version": self.index_version,
            "created_at": self.created_at,
            "model_id": self.model_id,
            "datasets": rows,
        }


def indexed_datasets(index: str) -> tuple[str, dict, dict[str, Indexed]]:
    """(version, manifest, name -> Indexed) of the version ``CURRENT`` names (or of a version
    folder), the manifest checked against its checksum; local or gs://."""
    folder, version = bundle.resolve(index)
    manifest = bundle.parse_manifest(storage.read_bytes(storage.join(folder, bundle.MANIFEST)))
    held = {
        d["name"]: Indexed(
            name=d["name"],
            version=str(d.get("version", "")),
            fingerprint=d.get("fingerprint"),
            images=int(d.get("images", 0)),
            faces=int(d.get("faces", 0)),
        )
        for d in manifest.get("datasets", [])
    }
    return version, manifest, held


def coverage(
    registries: str | Sequence[str] = catalog.DEFAULT_REGISTRIES, index: str | None = None
) -> Coverage:
    """Every data set of the registries (catalogue first, later folders winning) and, given an
    index root, whether its CURRENT version covers each."""
    folders = tuple(catalog.split_folders(registries))
    entries = catalog.load_layers(folders)
    held: dict[str, Indexed] = {}
    version = created = model_id = None
    if index is not None:
        version, manifest, held = indexed_datasets(index)
        created, model_id = manifest.get("created_at"), manifest.get("model_id")
    rows = [
        DatasetCoverage(
            name=name,
            version=e.spec.version,
            status=e.spec.status,
            license=e.spec.license,
            format=e.spec.format,
            source=e.spec.source,
            registry=e.folder,
            in_registry=True,
            indexed=held.get(name),
        )
        for name, e in entries.items()
    ]
    rows += [
        DatasetCoverage(
            name=name,
            version=None,
            status=None,
            license=None,
            format=None,
            source=None,
            registry=None,
            in_registry=False,
            indexed=ix,
        )
        for name, ix in sorted(held.items())
        if name not in entries
    ]
    return Coverage(folders, rows, index, version, created, model_id)
