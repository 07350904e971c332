"""The local engine: one machine, worker processes for decode+detect+embed, the driver for I/O.

The driver reads work units in order, hashes each image, and sends only images it has not met
in this run to a pool of worker processes (each loads the model once). Results come back in
input order through a bounded window, so memory stays bounded and units commit in order.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from ..core.config import DecodeConfig, JobConfig, ModelConfig
from ..core.faults import checkpoint
from ..core.isolate import IsolatedPool, limits_for, resolve_batch
from ..core.records import ImageResult, RawImage
from ..core.run import (
    RunState,
    RunSummary,
    Tally,
    UnitBuffer,
    finish_run,
    hold_run,
    read_manifest,
)
from ..core.sources import read_unit
from ..core.stages import read_error_result
from ..core.worker import analyze, describe, init_worker, reset
from .common import ModelInfo, default_batch_size, manifest_header, worker_model

log = logging.getLogger(__name__)


class InlineExecutor:
    """Runs tasks in the driver (workers=1): same code path, no processes."""

    def __init__(self, model_config: ModelConfig, decode: DecodeConfig):
        init_worker(model_config, decode)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)
        return future

    def shutdown(self, cancel_futures: bool = False) -> None:
        reset()


def _executor(job: JobConfig, workers: int):
    model = worker_model(job.model, (os.cpu_count() or 1) / workers)
    if job.decode.isolate:  # a crash, hang or memory blow-up in a decoder costs one image, not the job
        limits = limits_for(job.decode, model)
        return IsolatedPool(workers, limits, init_worker, (model, job.decode))
    if workers <= 1:
        return InlineExecutor(model, job.decode)
    # spawn, not fork: the driver runs HTTP threads, and forking a threaded process is unsafe
    return ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("spawn"),
        initializer=init_worker,
        initargs=(model, job.decode),
    )


# --- driver side ---------------------------------------------------------------------------


@dataclass
class Batch:
    """Images sent to a worker together."""

    data: list[bytes] = field(default_factory=list)
    future: Future | None = None
    results: list[ImageResult] | None = None  # once resolved (a crashed batch is retried only once)


@dataclass
class Slot:
    """One occurrence waiting in the window, in input order."""

    raw: RawImage
    buffer: UnitBuffer
    batch: Batch | None = None  # where its result comes from (None: known already)
    position: int = 0
    result: ImageResult | None = None
    owner: bool = False  # first occurrence of these bytes in the run: its faces are written


@dataclass
class UnitEnd:
    buffer: UnitBuffer


class LocalRun:
    def __init__(self, job: JobConfig, run_id: str, state: RunState, executor, info: ModelInfo):
        self.job, self.run_id, self.state, self.executor = job, run_id, state, executor
        self.model_id, self.dim = info.model_id, info.dim
        self.batch_size = default_batch_size(job.model, 0)
        workers = job.workers or os.cpu_count() or 1
        self.max_window = job.max_in_flight or 8 * workers * self.batch_size
        self.window: deque[Slot | UnitEnd] = deque()
        self.open_batch = Batch()
        self.inflight: dict[str, Slot] = {}  # sha -> owner slot not yet resolved
        self.analyzed = 0
        self.tally = Tally()
        self.bar = tqdm(
            total=sum(u.size or 0 for u in state.pending) or None,
            unit="img",
            disable=not job.progress,
            dynamic_ncols=True,
        )

    def run(self) -> None:
        for unit in self.state.pending:
            buffer = UnitBuffer(unit, self.run_id, self.model_id, self.dim)
            for raw in read_unit(unit, self.job.http):
                self._push(self._slot(raw, buffer))
            self._push(UnitEnd(buffer))
        while self.window:
            self._pop()
        self.bar.close()
        self.tally.check_end(self.job.max_error_fraction, self.job.min_images_for_budget)

    def _slot(self, raw: RawImage, buffer: UnitBuffer) -> Slot:
        if raw.data is None:
            return Slot(raw, buffer, result=read_error_result(raw))
        sha = raw.sha256
        assert sha is not None
        if sha in self.state.seen:
            return Slot(raw, buffer, result=self.state.seen[sha])
        if sha in self.inflight:
            first = self.inflight[sha]
            return Slot(raw, buffer, batch=first.batch, position=first.position)
        slot = Slot(raw, buffer, batch=self.open_batch, position=len(self.open_batch.data), owner=True)
        self.open_batch.data.append(raw.data)
        raw.data = None  # the batch holds the bytes now; keep one copy
        self.inflight[sha] = slot
        if len(self.open_batch.data) >= self.batch_size:
            self._submit()
        return slot

    def _submit(self) -> None:
        if self.open_batch.data:
            self.analyzed += len(self.open_batch.data)
            self.open_batch.future = self.executor.submit(analyze, self.open_batch.data)
            self.open_batch = Batch()
            checkpoint("analyze.batch")  # the driver, while a worker decodes

    def _push(self, item: Slot | UnitEnd) -> None:
        self.window.append(item)
        while len(self.window) > self.max_window:
            self._pop()

    def _pop(self) -> None:
        item = self.window.popleft()
        if isinstance(item, UnitEnd):
            item.buffer.commit(self.state.uri)
            return
        result = item.result or self._wait(item)
        item.buffer.add(item.raw, result, item.owner)
        self.tally.add(result)
        self.tally.check(self.job.max_error_fraction, self.job.min_images_for_budget)
        self.bar.update(1)
        elapsed = self.bar.format_dict["elapsed"] or 1e-9
        tally = self.tally
        self.bar.set_postfix_str(
            f"faces={tally.faces} ({tally.faces / elapsed:.1f}/s) errors={tally.status['error']}",
            refresh=False,
        )

    def _wait(self, slot: Slot) -> ImageResult:
        batch = slot.batch
        assert batch is not None
        if batch.future is None:
            self._submit()
        assert batch.future is not None
        if batch.results is None:  # a FatalError from a worker ends the job here
            batch.results = resolve_batch(self.executor, batch.future, analyze, batch.data)
        result = batch.results[slot.position]
        if slot.owner and result.image_sha256:
            self.inflight.pop(result.image_sha256, None)
            self.state.seen[result.image_sha256] = result.without_faces()
            batch.data[slot.position] = b""  # free the bytes once resolved
        return result


def run_job(
    job: JobConfig, known: dict[str, ImageResult] | None = None, known_from: list[str] | None = None
) -> RunSummary:
    """Run (or resume) an ingest job on this machine; returns the committed run's manifest.

    ``known``: image_sha256 -> result (faces as a count) of images whose faces earlier runs
    (``known_from``) committed with the same model: their occurrences get ``images`` rows here, but
    they are neither decoded nor embedded again (``faceaudit rebuild``'s incremental ingest).
    """
    started = dt.datetime.now(dt.timezone.utc)
    with hold_run(job) as state:  # this process is the run's one writer until the block ends
        run_id, uri = state.run_id, state.uri
        if state.committed:
            return RunSummary(run_id, uri, read_manifest(uri))
        for sha, result in (known or {}).items():
            state.seen.setdefault(sha, result)  # not an owner here: the faces are in ``known_from``
        workers = job.workers or os.cpu_count() or 1
        executor = _executor(job, workers)
        try:
            info = executor.submit(describe).result()
            local = LocalRun(job, run_id, state, executor, info)
            local.run()
        finally:
            executor.shutdown(cancel_futures=True)
        known_runs = None if known is None else known_from or []  # faces of known images live there
        body = finish_run(state, manifest_header(job, run_id, "local", info, started, known_runs))
    elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    return RunSummary(run_id, uri, body, len(state.done), elapsed, local.analyzed)
