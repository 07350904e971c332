"""The pure per-image stages: bytes -> decoded pixels -> faces -> an ``ImageResult``.

Engines call ``analyze_batch`` in their workers with a model loaded once per worker, and turn
results into table rows with ``image_row`` and ``face_rows``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from . import isolate, pdq
from .config import DecodeConfig
from .decode import decode_image
from .errors import RecordError
from .models.base import FaceModel
from .records import DecodedImage, ImageResult, RawImage, face_id
from .schema import PROVENANCE_FIELDS


def analyze_bytes(data: bytes, model: FaceModel, decode: DecodeConfig) -> ImageResult:
    """One image's bytes through decode, detect, align and embed."""
    return analyze_batch([data], model, decode)[0]


def analyze_batch(batch: Sequence[bytes], model: FaceModel, decode: DecodeConfig) -> list[ImageResult]:
    """Each image's result, in order. A bad image becomes an error result; nothing raises but
    a fatal error (which the engine lets end the job)."""
    return analyze_decoded([decode_one(data, decode) for data in batch], model)


def decode_one(data: bytes, decode: DecodeConfig) -> tuple[ImageResult, DecodedImage | None]:
    """The image's result so far (an error result if it does not decode) and its pixels.

    In an isolated worker the decode runs under ``decode.timeout_s`` (see ``isolate.guard``)."""
    result = ImageResult(image_sha256=hashlib.sha256(data).hexdigest(), status="ok")
    try:
        with isolate.guard("decode", decode.timeout_s):
            if decode.test_hooks:
                isolate.test_hook(data)
            image = decode_image(data, decode.max_pixels)
    except RecordError as exc:
        _fail(result, exc)
        return result, None
    result.width, result.height = image.width, image.height
    # every decoded image, faceless ones too: copies are found by PDQ whatever the detector sees
    result.pdq, result.pdq_quality = pdq.hash_pixels(image.pixels)
    return result, image


def analyze_decoded(
    items: Sequence[tuple[ImageResult, DecodedImage | None]], model: FaceModel
) -> list[ImageResult]:
    """Detect and embed the decoded images of ``decode_one``'s pairs; results in order."""
    results = [result for result, _ in items]
    decoded = [(i, image) for i, (_, image) in enumerate(items) if image is not None]
    with isolate.guard("detect", 0):  # marks the stage, so that a crash here is not blamed on decode
        for position, faces in _run_model(model, decoded):
            result = results[position]
            if isinstance(faces, RecordError):
                _fail(result, faces)
            else:
                result.faces = faces
                result.status = "ok" if faces else "no_face"
    return results


def _run_model(model: FaceModel, decoded: list[tuple[int, DecodedImage]]):
    """Yield (position, faces or RecordError). A failing batch is retried image by image so that
    one bad image does not fail its neighbours."""
    if not decoded:
        return
    try:
        outputs = model.analyze([image for _, image in decoded])
    except RecordError as exc:
        if len(decoded) == 1:
            yield decoded[0][0], exc
            return
        for item in decoded:
            yield from _run_model(model, [item])
        return
    for (position, _), faces in zip(decoded, outputs, strict=True):
        yield position, faces


def _fail(result: ImageResult, exc: RecordError) -> None:
    result.status = "error"
    result.error_stage = exc.stage
    result.error = exc.reason
    result.faces = []


def read_error_result(raw: RawImage) -> ImageResult:
    """The result of an occurrence whose bytes could not be read."""
    return ImageResult(image_sha256=None, status="error", error_stage="read", error=raw.error)


def image_row(
    result: ImageResult, dataset: str, source_uri: str, run_id: str, provenance: dict[str, str] | None = None
) -> dict:
    known = provenance or {}
    return {
        **result_fields(result),
        "dataset": dataset,
        "source_uri": source_uri,
        "run_id": run_id,
        **{name: known.get(name) for name in PROVENANCE_FIELDS},
    }


def result_fields(result: ImageResult) -> dict:
    """What an ``images`` row records of a result (``result_from_image_row`` reads it back)."""
    return {
        "image_sha256": result.image_sha256,
        "status": result.status,
        "error_stage": result.error_stage,
        "error": result.error,
        "width": result.width,
        "height": result.height,
        "n_faces": result.n_faces,
        "pdq": result.pdq,
        "pdq_quality": result.pdq_quality,
    }


# the ``images`` columns that ``result_fields`` writes and ``result_from_image_row`` reads back
RESULT_COLUMNS = tuple(result_fields(ImageResult(image_sha256=None, status="ok")))


def result_from_image_row(row: dict) -> ImageResult:
    """The result (faces as a count only) that a committed ``images`` row records."""
    result = ImageResult(
        row["image_sha256"],
        row["status"],
        row["error_stage"],
        row["error"],
        row["width"],
        row["height"],
        pdq=row.get("pdq"),
        pdq_quality=row.get("pdq_quality"),  # absent from runs before the columns
    )
    result.faces = [None] * row["n_faces"]  # type: ignore[list-item]  # only the count is known
    return result


def face_rows(result: ImageResult, dataset: str, source_uri: str, model_id: str, run_id: str) -> list[dict]:
    sha = result.image_sha256
    assert sha is not None or not result.faces
    return [
        {
            "face_id": face_id(sha, model_id, index),
            "image_sha256": sha,
            "dataset": dataset,
            "source_uri": source_uri,
            "face_index": index,
            "bbox": face.bbox,
            "det_score": face.det_score,
            "landmarks": face.landmarks,
            "embedding": face.embedding,
            "model_id": model_id,
            "run_id": run_id,
        }
        for index, face in enumerate(result.faces)
    ]
