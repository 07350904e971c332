"""Photos in, indexed faces out: the look-up behind ``faceaudit search`` and ``erase --photo``.

A query photo is as hostile as a data set's: it is read with the same cap and regular-file check
as ingest (``sources.read_bounded``) and decoded in an isolated worker process under the same
memory and time limits (``isolate.IsolatedPool``), so ``/dev/zero`` or a decompression bomb costs
one error, never the process. Each photo is then analysed with the model the index was built
from (its manifest's model config, which may only name a model from the model cache), and every
face found in it is searched; the hits at or above the match threshold are kept. The results are
dataclasses; the commands turn them into text or JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.errors import RecordError
from pipelines.core.names import is_name

from .errors import QueryError
from .search import Hit, Index

QUERY_MAX_BYTES = 32 << 20  # a photo of a person, not a data set
QUERY_READ_S = 30.0


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


def model_config(idx: Index):
    """The index's model config, refused when it would load files from outside the model cache:
    a bundle's manifest is data from a bucket, and a model is code's input."""
    from pipelines.core.config import ModelConfig

    config = ModelConfig.model_validate(idx.manifest["model"])
    if config.backend == "insightface":
        outside = [k for k in ("pack_root", "pack_sha256", "cache_dir") if getattr(config, k) is not None]
        if (config.pack is not None and not is_name(config.pack)) or outside:
            raise QueryError(
                "the index's model config names model files outside the model cache "
                f"({', '.join(outside) or 'pack ' + repr(config.pack)[:80]}); refusing to load them"
            )
    return config


def query_model(idx: Index):
    """The model the index was built with, loaded from its manifest's model config."""
    from pipelines.core.models import load_model

    model = load_model(model_config(idx))
    if model.model_id != idx.model_id:
        raise QueryError(f"the index's model config loads {model.model_id!r}, not {idx.model_id!r}")
    return model


def check_threshold(threshold: float) -> float:
    if not 0 < threshold < 1:
        raise QueryError(f"a match threshold must lie in (0, 1), not {threshold!r}")
    return threshold


def search_photos(
    idx: Index,
    photos: Iterable[str | Path],
    k: int,
    threshold: float | None = None,
    nprobe: int | None = None,
    model=None,
) -> PhotoSearch:
    """Per photo, per face found in it: the indexed faces at or above the threshold."""
    cut = check_threshold(idx.match_threshold if threshold is None else threshold)
    model = model or query_model(idx)
    results = []
    with decoder(idx) as decode:
        for photo in photos:
            result = analyze_photo(str(photo), model, decode)
            faces = []
            for i, face in enumerate(result.faces):
                hits = [h for h in idx.search(face.embedding, k, nprobe, model.model_id)[0] if h.score >= cut]
                bbox = [float(v) for v in face.bbox]
                faces.append(FaceMatches(i, bbox, float(face.det_score), hits, len(hits) == k))
            results.append(PhotoMatches(str(photo), result.status, result.error, faces))
    return PhotoSearch(idx.manifest["version"], idx.model_id, cut, k, results)


class IsolatedDecoder:
    """``decoder(data)`` -> (result, pixels): ingest's decode in ``workers`` isolated processes under
    ingest's memory and time limits; a worker that dies costs that photo an error result."""

    def __init__(self, idx: Index, workers: int = 1):
        from pipelines.core import isolate
        from pipelines.core.config import DecodeConfig

        self.config = DecodeConfig.model_validate({})
        self.pool = isolate.IsolatedPool(workers, isolate.limits_for(self.config, model_config(idx)))

    def __call__(self, data: bytes):
        from pipelines.core import isolate
        from pipelines.core.stages import decode_one

        try:
            return self.pool.submit(decode_one, data, self.config).result()
        except isolate.WorkerDied as died:
            return isolate.died_result(data, died), None

    def close(self, cancel_futures: bool = False) -> None:
        self.pool.shutdown(cancel_futures=cancel_futures)


@contextmanager
def decoder(idx: Index) -> Iterator[IsolatedDecoder]:
    """One isolated decode worker for all the photos of a search."""
    decode = IsolatedDecoder(idx)
    try:
        yield decode
    finally:
        decode.close()


def analyze_photo(photo: str, model, decode):
    """Read (capped, regular files only), decode (isolated), then detect and embed here."""
    from pipelines.core.records import ImageResult
    from pipelines.core.sources import read_bounded
    from pipelines.core.stages import analyze_decoded

    try:
        data = read_bounded(photo, QUERY_MAX_BYTES, QUERY_READ_S)
    except RecordError as exc:
        return ImageResult(image_sha256=None, status="error", error_stage="read", error=exc.reason)
    return analyze_decoded([decode(data)], model)[0]


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
