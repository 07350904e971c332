"""Finding the faces to erase: by photo (the model's calibrated threshold) or by id, image or source."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ..photos import all_matches
from ..search import Hit, Index


@dataclass(slots=True)
class Found:
    """An indexed face to erase, as it is listed for confirmation (never its embedding)."""

    face_id: int
    image_sha256: str
    face_index: int
    bbox: tuple[float, ...]
    occurrences: list[dict]
    score: float | None = None  # similarity to the photo it was found with

    @classmethod
    def from_hit(cls, hit: Hit) -> Found:
        occurrences = [{"dataset": o.dataset, "source_uri": o.source_uri} for o in hit.occurrences]
        return cls(hit.face_id, hit.image_sha256, hit.face_index, tuple(hit.bbox), occurrences, hit.score)


def find_by_photos(index: Index, photos: Iterable[str], threshold: float | None = None) -> list[Found]:
    """Every indexed face at or above the model's calibrated threshold of any face in the photos."""
    found: dict[int, Found] = {}
    for photo in photos:
        for hit in all_matches(index, photo, threshold):
            best = found.get(hit.face_id)
            if best is None or (best.score or 0) < hit.score:
                found[hit.face_id] = Found.from_hit(hit)
    return sorted(found.values(), key=lambda f: -(f.score or 0))


def find_by_ids(
    index: Index,
    face_ids: Iterable[int] = (),
    image_shas: Iterable[str] = (),
    source_uris: Iterable[str] = (),
) -> tuple[list[Found], list[str]]:
    """Indexed faces with one of the ids, or in one of the images; and the images to erase whole."""
    ids = pa.array(sorted({int(i) for i in face_ids}), pa.int64())
    shas = {s.lower() for s in image_shas}
    uris = set(source_uris)
    found: list[Found] = []
    for shard in index.shards:
        columns = ["face_id", "image_sha256", "face_index", "bbox", "occurrences"]
        meta = shard.metadata.file.read(columns=columns)
        hit = pc.is_in(meta.column("face_id"), value_set=ids)
        if shas:
            hit = pc.or_(hit, pc.is_in(meta.column("image_sha256"), value_set=pa.array(sorted(shas))))
        if uris:
            occurrences = meta.column("occurrences").to_pylist()
            in_uri = [any(o["source_uri"] in uris for o in occ) for occ in occurrences]
            hit = pc.or_(hit, pa.array(in_uri))
        for row in meta.filter(hit).to_pylist():
            found.append(
                Found(
                    row["face_id"],
                    row["image_sha256"],
                    row["face_index"],
                    tuple(row["bbox"]),
                    row["occurrences"],
                )
            )
    whole = sorted(shas | {f.image_sha256 for f in found if uris and _in_uris(f, uris)})
    return sorted(found, key=lambda f: f.face_id), whole


def _in_uris(face: Found, uris: set[str]) -> bool:
    return any(o["source_uri"] in uris for o in face.occurrences)
