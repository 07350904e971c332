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
    ]
)


def embedding_dim(schema: pa.Schema) -> int:
    """The dim of a ``faces`` schema's fixed-size embedding column."""
    return schema.field("embedding").type.list_size
