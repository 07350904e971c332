"""One photo's bytes in memory -> its faces and the indexed faces that match them, in two bands.

The look-up service's photo search. It reuses ``indexing.photos``: the index's own model config
(``model_config``, refused when it names files outside the model cache), the same isolated decode
as ingest and ``faceaudit search`` (``decode_one`` in an ``IsolatedPool`` under ingest's memory and
time limits, ``died_result`` for a worker that dies), and ``analyze_decoded``. The differences are
for a long-lived service: the bytes come from memory (never a file), one decode pool and one model
per worker live as long as the service, and every hit gets a band:

* ``strong``: at or above the model's calibrated threshold (the manifest's ``match_threshold``),
  the cut ``faceaudit search`` and ``erase --photo`` use;
* ``possible``: at or above a looser cut (``possible_threshold``) and below the strong one: the
  same person in a harder photo, or a look-alike. Shown so that a person can check, never erased
  without their request.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from pipelines.core.errors import FatalError

from .photos import IsolatedDecoder, query_model
from .search import Hit, Index

STRONG = "strong"
POSSIBLE = "possible"


def band(score: float, strong: float, possible: float) -> str | None:
    if score >= strong:
        return STRONG
    if score >= possible:
        return POSSIBLE
    return None


@dataclass(slots=True)
class BandedHit:
    hit: Hit
    band: str


@dataclass(slots=True)
class FaceResult:
    bbox: list[float]
    det_score: float
    matches: list[BandedHit] = field(default_factory=list)


@dataclass(slots=True)
class PhotoResult:
    status: str  # ok | no_face | error (as in the images table)
    error: str | None
    faces: list[FaceResult]


class PhotoLookup:
    """Loaded once: ``workers`` models and an isolated decode pool of ``workers`` processes.
    ``lookup(idx, data)`` is thread-safe; at most ``workers`` run at once (callers bound it)."""

    def __init__(self, idx: Index, workers: int = 1):
        self.model_id = idx.model_id
        self.models: queue.Queue = queue.Queue()
        for _ in range(workers):
            self.models.put(query_model(idx))
        self.decode = IsolatedDecoder(idx, workers)
        self.lock = threading.Lock()

    def lookup(self, idx: Index, data: bytes, k: int, possible: float) -> PhotoResult:
        """Decode (isolated), detect and embed (here), search each face; hits at or above
        ``possible``, banded against the index's calibrated threshold."""
        from pipelines.core.stages import analyze_decoded

        if idx.model_id != self.model_id:
            raise FatalError(f"the index now holds {idx.model_id!r}; the service loaded {self.model_id!r}")
        strong = idx.match_threshold
        cut = min(possible, strong)
        decoded = self.decode(data)
        model = self.models.get()
        try:
            result = analyze_decoded([decoded], model)[0]
        finally:
            self.models.put(model)
        del decoded  # the pixels go as soon as the model is done with them
        faces = []
        for face in result.faces:
            hits = idx.search(face.embedding, k, None, self.model_id)[0]
            banded = [BandedHit(h, band(h.score, strong, cut) or "") for h in hits if h.score >= cut]
            faces.append(FaceResult([round(float(v), 1) for v in face.bbox], float(face.det_score), banded))
        return PhotoResult(result.status, result.error, faces)

    def close(self) -> None:
        self.decode.close(cancel_futures=True)
