"""The index build's per-shard adds as an Apache Beam pipeline (DirectRunner, Dataflow, Flink, Spark).

    Create(shard numbers) -> Reshuffle -> BuildShard (build_shard; its result to a file)

The driver (``build_index``) scans, samples and trains. This runner stages the trained index, the
held-out queries and each shard's task as files in the version folder's ``_build/beam/`` (a task
lists row numbers, too big for a pipeline graph at scale), so workers on other machines read them
from the same storage; each worker loads the index and queries once (``setup``). A shard's files
and its result are committed whole under fixed names, so a retried or replayed bundle rewrites the
same bytes. The driver reads the results back, tunes nprobe and writes the manifest.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np

from pipelines.core import storage
from pipelines.engines.beam_engine import run_pipeline
from pipelines.engines.common import require

from .bundle import BUILD_DIR
from .shard import ShardResult, ShardTask, build_shard

beam = require("apache_beam", "beam")

TRAINED = "trained.faissindex"
QUERIES = "queries.npy"


def make_runner(pipeline_args: Sequence[str] = ()):
    """A ShardRunner for ``build_index``; ``pipeline_args`` are Beam pipeline options (without a
    ``--runner``, the DirectRunner runs the shards here)."""

    def run(tasks: list[ShardTask], trained: bytes, queries: np.ndarray) -> list[ShardResult]:
        return run_shards(tasks, trained, queries, list(pipeline_args))

    return run


def run_shards(
    tasks: list[ShardTask], trained: bytes, queries: np.ndarray, args: list[str]
) -> list[ShardResult]:
    stage = stage_inputs(tasks, trained, queries)
    run_pipeline(
        args,
        lambda p: (
            p
            | "Shards" >> beam.Create([t.k for t in tasks])
            | "Spread" >> beam.Reshuffle()
            | "Build" >> beam.ParDo(BuildShard(stage))
        ),
    )
    return [pickle.loads(storage.read_bytes(storage.join(stage, f"result-{t.k}.pkl"))) for t in tasks]


def stage_inputs(tasks: list[ShardTask], trained: bytes, queries: np.ndarray) -> str:
    """The workers' inputs as files beside the bundle being built; returns their folder."""
    stage = storage.join(tasks[0].folder, BUILD_DIR, "beam")
    storage.write_atomic(storage.join(stage, TRAINED), trained)
    storage.write_atomic(storage.join(stage, QUERIES), pickle.dumps(np.ascontiguousarray(queries)))
    for task in tasks:
        storage.write_atomic(storage.join(stage, f"task-{task.k}.pkl"), pickle.dumps(task))
    return stage


class BuildShard(beam.DoFn):
    """Shard number -> build_shard; the trained index and queries are read once per worker."""

    def __init__(self, stage: str):
        self.stage = stage

    def setup(self) -> None:
        self.trained = storage.read_bytes(storage.join(self.stage, TRAINED))
        self.queries = pickle.loads(storage.read_bytes(storage.join(self.stage, QUERIES)))

    def process(self, k: int):
        task: ShardTask = pickle.loads(storage.read_bytes(storage.join(self.stage, f"task-{k}.pkl")))
        result = build_shard(task, self.trained, self.queries)
        storage.write_atomic(storage.join(self.stage, f"result-{k}.pkl"), pickle.dumps(result))
        yield k
