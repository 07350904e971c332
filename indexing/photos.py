"""Photos in, indexed faces out: the look-up behind ``faceaudit search`` and ``erase --photo``.

Each photo is analysed with the model the index was built from (its manifest's model config), and
every face found in it is searched; the hits at or above the match threshold are kept. The
results are dataclasses; the commands turn them into text or JSON.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipelines.core import storage

from .errors import QueryError
from .search import Hit, Index


@dataclass(slots=True)
class FaceMatches:
    """One face found in a photo and the indexed faces that match it, best first."""

    face_index: int
    bbox: list[float]
    det_score: float
    matches: list[Hit]
    more_may_exist: bool  # every one of the k hits matched: a larger k may find more

    @property
    def images(self) -> int:
        return len({h.image_sha256 for h in self.matches})

    @property
    def datasets(self) -> list[str]:
        return sorted({o.dataset for h in self.matches for o in h.occurrences})


@dataclass(slots=True)
class PhotoMatches:
    photo: str
    status: str  # ok, no_face or error, as in the images table
    error: str | None
    faces: list[FaceMatches]


@dataclass(slots=True)
class PhotoSearch:
    version: str
    model_id: str
    threshold: float
    k: int
    photos: list[PhotoMatches]


def query_model(idx: Index):
    """The model the index was built with, loaded from its manifest's model config."""
    from pipelines.core.config import ModelConfig
    from pipelines.core.models import load_model

    model = load_model(ModelConfig.model_validate(idx.manifest["model"]))
    if model.model_id != idx.model_id:
        raise QueryError(f"the index's model config loads {model.model_id!r}, not {idx.model_id!r}")
    return model


def search_photos(
    idx: Index,
    photos: Iterable[str | Path],
    k: int,
    threshold: float | None = None,
    nprobe: int | None = None,
    model=None,
) -> PhotoSearch:
    """Per photo, per face found in it: the indexed faces at or above the threshold."""
    from pipelines.core.config import DecodeConfig
    from pipelines.core.stages import analyze_bytes

    model = model or query_model(idx)
    cut = idx.match_threshold if threshold is None else threshold
    decode = DecodeConfig.model_validate({})
    results = []
    for photo in photos:
        result = analyze_bytes(storage.read_bytes(str(photo)), model, decode)
        faces = []
        for i, face in enumerate(result.faces):
            hits = [h for h in idx.search(face.embedding, k, nprobe, model.model_id)[0] if h.score >= cut]
            bbox = [float(v) for v in face.bbox]
            faces.append(FaceMatches(i, bbox, float(face.det_score), hits, len(hits) == k))
        results.append(PhotoMatches(str(photo), result.status, result.error, faces))
    return PhotoSearch(idx.manifest["version"], idx.model_id, cut, k, results)


def all_matches(idx: Index, photo: str | Path, threshold: float | None = None, model=None) -> list[Hit]:
    """Every indexed face that matches any face of the photo (k widens until the matches stop
    filling it), each with the best score it reached."""
    model = model or query_model(idx)
    k = min(max(idx.ntotal, 1), 64)
    while True:
        found = search_photos(idx, [photo], k, threshold, None, model)
        faces = found.photos[0].faces
        if not any(f.more_may_exist for f in faces) or k >= idx.ntotal:
            break
        k = min(k * 4, idx.ntotal)
    best: dict[int, Hit] = {}
    for face in faces:
        for hit in face.matches:
            if hit.face_id not in best or best[hit.face_id].score < hit.score:
                best[hit.face_id] = hit
    return list(best.values())
