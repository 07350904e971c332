"""How an index version is built: one typed config, with help text and one set of defaults.

``faceaudit index build`` takes its flags (and their help) from these fields, and
``faceaudit rebuild``'s ``index_settings`` extends them, so a default is written once.
"""

from __future__ import annotations

from pydantic import Field

from pipelines.core.config import Strict

from .params import FLAT_MAX


class BuildOptions(Strict):
    """How to build; every field has a CLI flag of the same name."""

    max_bytes_per_vector: int | None = Field(
        None, description="RAM per vector, codes plus 8-byte id (None: no budget, exact or IVF-Flat)"
    )
    opq: bool = Field(False, description="rotate with OPQ before PQ (slower build)")
    rerank: bool = Field(True, description="exact re-ranking of PQ candidates from a float16 store on disk")
    rerank_factor: int = Field(
        10, ge=1, description="candidates re-ranked per wanted hit (the first depth tried)"
    )
    on_disk: bool = Field(False, description="inverted lists in memory-mapped .ivfdata files (IVF only)")
    target_recall: float = Field(0.95, gt=0, le=1, description="recall@10 that the tuned nprobe must reach")
    vectors_per_shard: int = Field(1_000_000, ge=1, description="vectors per FAISS shard")
    recall_queries: int = Field(1000, ge=1, description="held-out queries for the recall measurement")
    seed: int = Field(1234, description="seed of the training and query samples")
    use_gpu: bool | None = Field(None, description="train and add on a GPU (None: when faiss sees one)")
    flat_max: int = Field(FLAT_MAX, ge=0, description="exact search up to this many vectors")
    nlist: int | None = Field(None, ge=1, description="inverted lists (default: about 4*sqrt(n))")
    threads: int | None = Field(None, ge=1, description="faiss threads (default: one per core)")
    max_rerank_factor: int = Field(
        80, ge=1, description="re-rank depth doubles up to this while recall@10 misses the target"
    )
    erasure_log: str | None = Field(
        None, description="erasure log whose faces are never indexed (default: <out>/_erasure)"
    )


def default(name: str):
    """A field's default, for flags that mirror it."""
    return BuildOptions.model_fields[name].default


def describe(name: str) -> str:
    """A field's help text, for flags that mirror it."""
    return BuildOptions.model_fields[name].description or ""
