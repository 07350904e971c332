"""The build's inputs: which faces rows are indexed, a seeded sample of them, and the trained index.

1. ``scan_ids`` reads the face_id column only: it checks every faces shard's sha256 and model,
   keeps each face_id's first row (duplicates across runs are dropped) unless an erasure log names
   it, and keeps 64 bits of each row's image sha256.
2. ``train`` reads the embeddings of a seeded random sample: the training set and disjoint
   held-out queries; the empty index is trained once.
3. ``pieces_for`` says which faces-shard rows make up bundle shard k (kept rows ``[lo, hi)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from pipelines.core import erasure

from . import gpu
from . import runs as runsmod
from .options import BuildOptions
from .params import IndexPlan
from .runs import Run, Shard

KMEANS_ITERATIONS = 10


@dataclass(slots=True)
class Inputs:
    """The faces shards in read order and, per shard, which rows survive de-duplication and 64 bits
    of each row's image sha256 (to route occurrences to bundle shards)."""

    shards: list[Shard]
    keep: list[np.ndarray]
    keys: list[np.ndarray]
    rows: int
    erased: int = 0  # rows an erasure log names (docs/erasure.md)

    @property
    def unique(self) -> int:
        return int(sum(int(k.sum()) for k in self.keep))


@dataclass(slots=True)
class Piece:
    """The rows of one faces shard that go into one bundle shard (row numbers in the file, sorted)."""

    shard: Shard
    rows: np.ndarray


def scan_ids(runs: list[Run], model_id: str, erased: erasure.ErasureSet = erasure.EMPTY) -> Inputs:
    """Pass 1: verify shards, read face_ids, keep each face_id's first row in run/shard order,
    unless an erasure log names the face."""
    shards = [s for r in runs for s in r.faces]
    per_shard, keys, gone = [], [], []
    for shard in shards:
        runsmod.verify_shard(shard)
        ids, shas = [], []
        for batch in runsmod.iter_batches(shard, ["face_id", "model_id", "image_sha256"]):
            runsmod.check_batch_model(batch, model_id, shard)
            ids.append(batch.column(0).to_numpy())
            shas.append(runsmod.sha_keys(batch.column(2), shard.uri))
            if erased:
                shas_of_rows = batch.column(2).to_pylist() if erased.whole_images else None
                gone.append(erased.mask(ids[-1], shas_of_rows))
        per_shard.append(np.concatenate(ids) if ids else np.zeros(0, np.int64))
        keys.append(np.concatenate(shas) if shas else np.zeros(0, np.uint64))
    all_ids = np.concatenate(per_shard) if per_shard else np.zeros(0, np.int64)
    keep = np.zeros(len(all_ids), dtype=bool)
    keep[np.unique(all_ids, return_index=True)[1]] = True
    erased_rows = np.concatenate(gone) if gone else np.zeros(len(all_ids), dtype=bool)
    keep &= ~erased_rows
    cuts = np.cumsum([0, *[len(a) for a in per_shard]])
    return Inputs(
        shards,
        [keep[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)],
        keys,
        len(all_ids),
        int(erased_rows.sum()),
    )


def kept_batches(inputs: Inputs, columns: list[str]):
    """(kept-row offset, kept rows of a batch) over every faces shard, in build order."""
    offset = 0
    for shard, keep in zip(inputs.shards, inputs.keep, strict=True):
        row = 0
        for batch in runsmod.iter_batches(shard, columns):
            mask = keep[row : row + batch.num_rows]
            row += batch.num_rows
            kept = batch.filter(pa.array(mask)) if not mask.all() else batch
            if kept.num_rows:
                yield offset, kept
                offset += kept.num_rows


def read_positions(inputs: Inputs, positions: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: (vectors, face_ids) at kept-row ``positions``, in the order given."""
    order = np.argsort(positions, kind="stable")
    wanted = positions[order]
    vecs = np.zeros((len(positions), dim), dtype=np.float32)
    ids = np.zeros(len(positions), dtype=np.int64)
    for offset, batch in kept_batches(inputs, ["face_id", "embedding"]):
        lo, hi = np.searchsorted(wanted, [offset, offset + batch.num_rows])
        if lo == hi:
            continue
        local = wanted[lo:hi] - offset
        vecs[order[lo:hi]] = runsmod.embeddings(batch, dim)[local]
        ids[order[lo:hi]] = batch.column(0).to_numpy()[local]
    return vecs, ids


def train(
    inputs: Inputs, plan: IndexPlan, opts: BuildOptions, use_gpu: bool, dim: int
) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(held-out queries, their face_ids, the trained empty index serialised), from a seeded sample."""
    rng = np.random.default_rng(opts.seed)
    n = inputs.unique
    n_queries = min(opts.recall_queries, max(1, n // 10))
    picks = rng.permutation(n)
    query_pos = np.sort(picks[:n_queries])
    train_pos = np.sort(picks[n_queries : n_queries + plan.train_size]) if plan.train_size else query_pos[:0]
    sample = read_positions(inputs, np.concatenate([query_pos, train_pos]), dim)
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # k-means is most of a build's time; pin faiss 1.15's default of 10 iterations across versions
        ivf.cp.niter = KMEANS_ITERATIONS
    if not index.is_trained:
        gpu.train(index, sample[0][n_queries:], use_gpu)
    return sample[0][:n_queries], sample[1][:n_queries], faiss.serialize_index(index).tobytes()


def shard_bounds(n: int, per_shard: int) -> list[tuple[int, int]]:
    """Bundle shard k holds kept rows [k*per_shard, (k+1)*per_shard): fixed by n alone, whatever runs them."""
    return [(lo, min(lo + per_shard, n)) for lo in range(0, n, per_shard)]


def pieces_for(inputs: Inputs, lo: int, hi: int) -> list[Piece]:
    """The faces-shard rows that are kept rows [lo, hi), in build order."""
    pieces, offset = [], 0
    for shard, keep in zip(inputs.shards, inputs.keep, strict=True):
        kept = np.flatnonzero(keep)
        a, b = max(lo - offset, 0), min(hi - offset, len(kept))
        if a < b:
            pieces.append(Piece(shard, kept[a:b]))
        offset += len(kept)
    return pieces
