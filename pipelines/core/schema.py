"""The two Parquet tables of DESIGN.md, exactly: ``faces`` and ``images``."""

from __future__ import annotations

import pyarrow as pa

IMAGE_STATUSES = ("ok", "no_face", "error")


def faces_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("face_id", pa.int64()),
            ("image_sha256", pa.string()),
            ("dataset", pa.string()),
            ("source_uri", pa.string()),
            ("face_index", pa.int16()),
            ("bbox", pa.list_(pa.float32(), 4)),
            ("det_score", pa.float32()),
            ("landmarks", pa.list_(pa.float32(), 10)),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("model_id", pa.string()),
            ("run_id", pa.string()),
        ]
    )


IMAGES_SCHEMA = pa.schema(
    [
        ("image_sha256", pa.string()),
        ("dataset", pa.string()),
        ("source_uri", pa.string()),
        ("status", pa.string()),
        ("error_stage", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_faces", pa.int16()),
        ("run_id", pa.string()),
        # provenance, where the data set's format knows it (never an identity label)
        ("record_id", pa.string()),
        ("origin_url", pa.string()),
        ("page_url", pa.string()),
        ("owner", pa.string()),
        ("license", pa.string()),
        # PDQ perceptual hash of the decoded image, to find the same photo re-encoded
        ("pdq", pa.binary(32)),
        ("pdq_quality", pa.int16()),
    ]
)

# The nullable columns added after the first runs were written: readers of an older run's
# ``images`` table see them as nulls.
PROVENANCE_FIELDS = ("record_id", "origin_url", "page_url", "owner", "license")
ADDED_IMAGE_FIELDS = (*PROVENANCE_FIELDS, "pdq", "pdq_quality")


def embedding_dim(schema: pa.Schema) -> int:
    """The dim of a ``faces`` schema's fixed-size embedding column."""
    return schema.field("embedding").type.list_size
