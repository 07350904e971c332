"""Which FAISS index fits a collection: pure functions of its size, dim and a memory budget.

The rules follow autofaiss: exact search while the collection is small, an inverted file above
that, with ``nlist`` growing as the square root of the size, and product quantisation once full
vectors no longer fit the per-vector budget. ``nprobe`` is not chosen here; the build tunes it
against exact search (see ``recall.tune_nprobe``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.core.errors import ConfigError

# Below this many vectors exact search is fast enough and needs no training.
FLAT_MAX = 20_000
# k-means wants at least ~39 training points per centroid (faiss warns below that).
MIN_POINTS_PER_CENTROID = 39
TRAIN_POINTS_PER_CENTROID = 40
# PQ with 8-bit codes trains 256 centroids per sub-quantizer.
PQ_MIN_TRAIN = 256 * MIN_POINTS_PER_CENTROID
ID_BYTES = 8


@dataclass(frozen=True, slots=True)
class IndexPlan:
    """What to build. ``bytes_per_vector`` is the RAM estimate: codes plus the 8-byte id."""

    kind: str  # "flat" | "ivf_flat" | "ivf_pq"
    factory: str
    nlist: int = 0
    pq_m: int = 0
    pq_bits: int = 0
    opq: bool = False
    rerank: bool = False
    bytes_per_vector: int = 0
    train_size: int = 0


def nlist_for(n: int) -> int:
    """A power of two near 4*sqrt(n), small enough to train with enough points per centroid."""
    if n < MIN_POINTS_PER_CENTROID:
        return 1
    target = 4 * math.sqrt(n)
    nlist = 2 ** round(math.log2(target))
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > n:
        nlist //= 2
    return nlist


def code_bytes(m: int, bits: int) -> int:
    return (m * bits + 7) // 8


def pq_m_for(dim: int, max_bytes_per_vector: int, bits: int = 4) -> int:
    """The most sub-quantizers that divide ``dim`` and whose codes fit the budget.

    4-bit codes (fast-scan) take any even m. 8-bit codes prefer sub-vectors of 4 dims or more:
    faiss trains 256-centroid k-means on 1- or 2-dim sub-vectors very slowly (measured: ~60 s for
    PQ64x8 on 40k 128-d vectors on 2 cores, against ~2 s for PQ32x8).
    """
    room = max_bytes_per_vector - ID_BYTES
    fits = [m for m in range(1, dim + 1) if dim % m == 0 and code_bytes(m, bits) <= room]
    if bits == 4:
        fits = [m for m in fits if m % 2 == 0]
    if bits == 8 and any(dim // m >= 4 for m in fits):
        fits = [m for m in fits if dim // m >= 4]
    if not fits:
        raise ConfigError(
            f"--max-bytes-per-vector {max_bytes_per_vector} leaves no room for a {bits}-bit code of "
            f"dim {dim}: each vector also needs {ID_BYTES} bytes for its id"
        )
    return fits[-1]


def train_size_for(n: int, nlist: int, pq: bool) -> int:
    want = max(TRAIN_POINTS_PER_CENTROID * nlist, PQ_MIN_TRAIN if pq else 0)
    return min(n, want)


def choose_plan(
    n: int,
    dim: int,
    max_bytes_per_vector: int | None = None,
    opq: bool = False,
    rerank: bool = True,
    flat_max: int = FLAT_MAX,
    nlist: int | None = None,
    on_disk: bool = False,
) -> IndexPlan:
    """The index for ``n`` vectors of ``dim``; ``max_bytes_per_vector`` None means no RAM budget.

    ``rerank`` asks for exact re-ranking from the on-disk float16 store; it only applies to
    PQ, whose scores are approximate (flat codes are already exact). PQ codes are 4-bit
    fast-scan (fastest to train and to scan) unless ``on_disk``: faiss's OnDiskInvertedLists
    cannot hold fast-scan's packed blocks, so on-disk bundles use 8-bit codes.
    """
    if on_disk:
        flat_max = 0  # on-disk lists need an inverted file
    if n < 1 or dim < 1:
        raise ConfigError(f"cannot index {n} vectors of dim {dim}")
    flat_bytes = 4 * dim + ID_BYTES
    fits_flat = max_bytes_per_vector is None or flat_bytes <= max_bytes_per_vector
    if n <= flat_max and fits_flat:
        return IndexPlan("flat", "IDMap,Flat", bytes_per_vector=flat_bytes)
    nlist = nlist or nlist_for(n)
    if fits_flat:
        return IndexPlan(
            "ivf_flat",
            f"IVF{nlist},Flat",
            nlist=nlist,
            bytes_per_vector=flat_bytes,
            train_size=train_size_for(n, nlist, pq=False),
        )
    assert max_bytes_per_vector is not None
    bits = 8 if on_disk else 4
    m = pq_m_for(dim, max_bytes_per_vector, bits)
    prefix = f"OPQ{m}_{dim}," if opq else ""
    codes = f"PQ{m}x8" if bits == 8 else f"PQ{m}x4fs"
    return IndexPlan(
        "ivf_pq",
        f"{prefix}IVF{nlist},{codes}",
        nlist=nlist,
        pq_m=m,
        pq_bits=bits,
        opq=opq,
        rerank=rerank,
        bytes_per_vector=code_bytes(m, bits) + ID_BYTES,
        train_size=train_size_for(n, nlist, pq=bits == 8),
    )
