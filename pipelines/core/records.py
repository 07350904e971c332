"""The records that flow between stages. Dataclasses, not tuples (after datatrove's Document)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class WorkUnit:
    """A deterministic slice of one data set's source: the unit of resume and of parallelism.

    ``key`` names the unit in shard file names and never changes between runs of the same
    source listing. ``items`` are the locators inside the source (file paths, tar member names,
    URIs), in a fixed order.
    """

    dataset: str
    source: str
    kind: str  # "folder" | "tar" | "urilist" | "msceleb-tsv" | "hf-parquet" | "flickr-meta"
    index: int
    items: tuple[str, ...]
    # where its items may be (``roots.allowed``): the source folder, or a list's folder and the
    # job's allowed roots; () for units made by hand, which are not checked
    roots: tuple[str, ...] = field(default=(), compare=False)
    # the rows of a record file (``items`` is that one file) the unit reads, () for other kinds:
    # line formats (first_row, start_byte, end_byte), byte offsets at line starts; hf-parquet
    # (first_row, row_group, offset_in_group, rows)
    span: tuple[int, ...] = ()
    # hf-parquet: the columns the unit reads (the image's, then an id's); nothing else is read
    columns: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.dataset}-{self.index:06d}"

    @property
    def size(self) -> int | None:
        """How many records the unit holds, where its listing says: a folder's or list's items, a
        Parquet slice's rows; None for a tar or a line-record file (known once read)."""
        if self.kind in ("folder", "urilist"):
            return len(self.items)
        return self.span[3] if self.kind == "hf-parquet" else None


@dataclass(slots=True)
class RawImage:
    """The bytes of one occurrence, or why they could not be read."""

    dataset: str
    source_uri: str
    data: bytes | None = None
    error: str | None = None  # set when the bytes could not be read (stage "read")
    # what the data set's format says of the record (schema.PROVENANCE_FIELDS); None when nothing
    provenance: dict[str, str] | None = None

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else None


@dataclass(slots=True)
class DecodedImage:
    """8-bit RGB pixels of the EXIF-corrected original, shape (height, width, 3)."""

    pixels: np.ndarray

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(slots=True)
class Face:
    """One detection: box and landmarks in original pixels, an L2-normalised embedding."""

    bbox: np.ndarray  # float32 [4]: x1, y1, x2, y2
    det_score: float
    landmarks: np.ndarray  # float32 [10]: 5 points, x then y
    embedding: np.ndarray  # float32 [dim], unit length


@dataclass(slots=True)
class ImageResult:
    """What the stages made of one image's bytes (shared by all its occurrences)."""

    image_sha256: str | None
    status: str  # "ok" | "no_face" | "error"
    error_stage: str | None = None
    error: str | None = None
    width: int | None = None
    height: int | None = None
    faces: list[Face] = field(default_factory=list)
    pdq: bytes | None = None  # 32-byte PDQ perceptual hash of the decoded pixels
    pdq_quality: int | None = None

    @property
    def n_faces(self) -> int:
        return len(self.faces)

    def without_faces(self) -> ImageResult:
        """What a later occurrence of the same bytes needs: everything but the faces themselves
        (kept only as a count, since their rows are written once, at the owner)."""
        slim = ImageResult(
            self.image_sha256,
            self.status,
            self.error_stage,
            self.error,
            self.width,
            self.height,
            pdq=self.pdq,
            pdq_quality=self.pdq_quality,
        )
        slim.faces = [None] * self.n_faces  # type: ignore[list-item]
        return slim


def face_id(image_sha256: str, model_id: str, face_index: int) -> int:
    """The FAISS id of a face: first 8 bytes of SHA-256 of ``sha:model:index``, sign bit cleared."""
    digest = hashlib.sha256(f"{image_sha256}:{model_id}:{face_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a loaded model makes: recorded in every run manifest."""

    model_id: str
    dim: int
    match_threshold: float
    provenance: dict | None = None  # e.g. an insightface pack's files, sha256s and licence
