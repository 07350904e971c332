"""The index build's per-shard adds as an Apache Beam pipeline (DirectRunner, Dataflow, Flink, Spark).

    Create(shard numbers) -> Reshuffle -> BuildShard (build_shard; its result to a file)

The driver (``build_index``) scans, samples and trains. This runner stages the trained index, the
held-out queries and each shard's task as files in the version folder's ``_build/beam/`` (a task
lists row numbers, too big for a pipeline graph at scale), so workers on other machines read them
from the same storage; each worker loads the index and queries once (``setup``). The staged files
are JSON and ``.npy`` (read with ``allow_pickle=False``), never pickle: whoever can write the
index bucket must not be able to run code on the workers. A shard's files
and its result are committed whole under fixed names, so a retried or replayed bundle rewrites the
same bytes. The driver reads the results back, tunes nprobe and writes the manifest.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from pipelines.core import storage
from pipelines.engines.beam_engine import run_pipeline
from pipelines.engines.common import require

from .bundle import BUILD_DIR
from .inputs import Piece
from .runs import Shard
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
    return [read_result(stage, t.k) for t in tasks]


def stage_inputs(tasks: list[ShardTask], trained: bytes, queries: np.ndarray) -> str:
    """The workers' inputs as files beside the bundle being built; returns their folder."""
    stage = storage.join(tasks[0].folder, BUILD_DIR, "beam")
    storage.write_atomic(storage.join(stage, TRAINED), trained)
    storage.write_atomic(storage.join(stage, QUERIES), npy_bytes(np.ascontiguousarray(queries)))
    for task in tasks:
        write_task(stage, task)
    return stage


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def read_npy(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def write_task(stage: str, task: ShardTask) -> None:
    """A task as JSON, each piece's row numbers as an .npy file beside it."""
    fields = {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.name != "pieces"}
    fields["pieces"] = []
    for i, piece in enumerate(task.pieces):
        rows = f"task-{task.k}-rows-{i}.npy"
        storage.write_atomic(storage.join(stage, rows), npy_bytes(np.asarray(piece.rows, dtype=np.int64)))
        fields["pieces"].append({"shard": asdict(piece.shard), "rows": rows})
    storage.write_atomic(storage.join(stage, f"task-{task.k}.json"), json.dumps(fields).encode())


def read_task(stage: str, k: int) -> ShardTask:
    fields = json.loads(storage.read_bytes(storage.join(stage, f"task-{k}.json")))
    pieces = [
        Piece(Shard(**p["shard"]), read_npy(storage.join(stage, _plain(p["rows"]))))
        for p in fields.pop("pieces")
    ]
    return ShardTask(pieces=pieces, **fields)


def write_result(stage: str, k: int, result: ShardResult) -> None:
    storage.write_atomic(storage.join(stage, f"result-{k}.json"), json.dumps(result.entry).encode())
    storage.write_atomic(storage.join(stage, f"result-{k}-scores.npy"), npy_bytes(result.scores))
    storage.write_atomic(storage.join(stage, f"result-{k}-ids.npy"), npy_bytes(result.ids))


def read_result(stage: str, k: int) -> ShardResult:
    entry = json.loads(storage.read_bytes(storage.join(stage, f"result-{k}.json")))
    scores = read_npy(storage.join(stage, f"result-{k}-scores.npy"))
    return ShardResult(entry, scores, read_npy(storage.join(stage, f"result-{k}-ids.npy")))


def _plain(name: str) -> str:
    """A staged file's name, as this module writes them: never a path out of the stage folder."""
    if "/" in name or name.startswith(".") or not name.endswith(".npy"):
        raise ValueError(f"unexpected staged file name {name[:80]!r}")
    return name


class BuildShard(beam.DoFn):
    """Shard number -> build_shard; the trained index and queries are read once per worker."""

    def __init__(self, stage: str):
        self.stage = stage

    def setup(self) -> None:
        self.trained = storage.read_bytes(storage.join(self.stage, TRAINED))
        self.queries = read_npy(storage.join(self.stage, QUERIES))

    def process(self, k: int):
        result = build_shard(read_task(self.stage, k), self.trained, self.queries)
        write_result(self.stage, k, result)
        yield k
