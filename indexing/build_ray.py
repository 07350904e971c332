"""The index build's per-shard adds as Ray tasks, on a local Ray or a Ray cluster.

The driver (``build_index``) scans, samples and trains; this runner puts the trained index and the
held-out queries in the object store once and runs ``build_shard`` for every bundle shard as a
task. Each task commits its shard's files (temporary name, then rename or upload), so a task that
dies and is retried by Ray rewrites the same bytes under the same names: nothing is duplicated.
The driver then tunes nprobe, writes the manifest and moves CURRENT, as for a local build.
"""

from __future__ import annotations

import os

import numpy as np

from pipelines.core.faults import checkpoint, ray_options
from pipelines.engines.common import require

from .shard import ShardResult, ShardTask, build_shard

MAX_RETRIES = 3  # a worker that dies (lost node, OOM kill) has its shard re-run this many times


def make_runner(address: str | None = None, cpus_per_shard: float = 1.0):
    """A ShardRunner for ``build_index``; ``address`` (or RAY_ADDRESS) joins a cluster, else a local
    Ray is started for the build."""

    def run(tasks: list[ShardTask], trained: bytes, queries: np.ndarray) -> list[ShardResult]:
        return run_shards(tasks, trained, queries, address, cpus_per_shard)

    return run


def run_shards(
    tasks: list[ShardTask], trained: bytes, queries: np.ndarray, address: str | None, cpus_per_shard: float
) -> list[ShardResult]:
    ray = require("ray", "ray")
    started_here = _connect(ray, address)
    try:
        trained_ref, queries_ref = ray.put(trained), ray.put(queries)
        options = {"num_cpus": cpus_per_shard, "max_retries": MAX_RETRIES, **ray_options()}
        remote = ray.remote(_shard_task).options(**options)
        refs = [remote.remote(task, trained_ref, queries_ref, cpus_per_shard) for task in tasks]
        return ray.get(refs)
    finally:
        if started_here:
            ray.shutdown()


def _connect(ray, address: str | None) -> bool:
    """Join ``address`` (or RAY_ADDRESS) or start a local Ray, unless one is up. True if started here."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
    return True


def _shard_task(task: ShardTask, trained: bytes, queries: np.ndarray, cpus: float) -> ShardResult:
    import faiss

    # faiss would start a thread per core of the node; the task reserved ``cpus`` of them
    faiss.omp_set_num_threads(max(1, int(cpus)))
    checkpoint("index.shard_task")
    return build_shard(task, trained, queries)
