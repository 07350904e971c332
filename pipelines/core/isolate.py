"""Worker processes that a native crash, a hang or runaway memory cannot take the job down with.

Decoding hostile bytes runs third-party C (libjpeg, libpng, libtiff, libwebp). A bug there can
segfault, loop or allocate without end, and a try/except cannot catch any of it. So the stages
run in worker processes that:

* live under an address-space limit (``RLIMIT_AS``, ``decode.memory_limit_mb``): an allocation
  past it fails, and Pillow and numpy raise ``MemoryError``, which becomes the image's error row;
* arm a wall-clock timer around each decode (``guard``). The timer's signal, SIGALRM, keeps its
  default action, so the kernel ends the worker even when the decoder never returns to Python;
* write the stage they are in to memory the driver can read, so that when a worker dies the
  driver knows which stage of which task killed it.

``IsolatedPool`` runs tasks on such workers, one task per worker at a time (so a death names its
task), replaces a worker that dies and fails only that task's future with ``WorkerDied``.
``resolve_batch`` turns that into rows: a batch that killed its worker is retried one image per
task, and the image that kills a worker on its own becomes an error row naming the stage.

The core imports no engine: the local engine uses the pool for its workers, the Ray engine gives
each model actor a pool of one, and the Beam engine uses Beam's own subprocess handling instead.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import logging
import multiprocessing as mp
import os
import pickle
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from .config import DecodeConfig, ModelConfig
from .errors import STAGES, FatalError, RecordError
from .records import ImageResult

log = logging.getLogger(__name__)

# Inputs that trigger a real crash or hang inside a worker, for tests only: honoured only when the
# job sets decode.test_hooks, and only inside an isolated worker process.
TEST_SEGFAULT = b"FACEAUDIT-TEST-HOOK:SEGFAULT"
TEST_HANG = b"FACEAUDIT-TEST-HOOK:HANG"
TEST_CRASH_ONCE = b"FACEAUDIT-TEST-HOOK:CRASH-ONCE:"  # + a marker file's path: crash if it is absent

IDLE = -1  # the stage mark of a worker that is not inside a guarded stage

# Set in a worker process by _worker_main; None in any other process (the guard is then a no-op).
_mark = None
_isolated = False  # this process decodes in isolation: its death costs one image, not the job


@dataclass(frozen=True, slots=True)
class Limits:
    memory_limit_mb: int = 0  # RLIMIT_AS of each worker (0: none)
    timeout_s: float = 0.0  # wall-clock limit of one guarded stage (0: none)


GPU_PROVIDERS = ("cuda", "tensorrt")


def limits_for(decode: DecodeConfig, model: ModelConfig) -> Limits:
    """The workers' limits from the job's config. No address-space limit on a GPU: the CUDA driver
    reserves tens of GB of virtual addresses at start, and would fail under any useful limit."""
    memory = decode.memory_limit_mb
    on_ort = model.backend == "insightface" or model.runtime == "onnx"  # providers apply to ORT only
    if memory and on_ort and set(model.providers) & set(GPU_PROVIDERS):
        log.info("no address-space limit on GPU workers (CUDA reserves more than decode.memory_limit_mb)")
        memory = 0
    return Limits(memory, decode.timeout_s)


class WorkerDied(Exception):
    """The worker running a task ended without answering (a crash, a timeout, a kill)."""

    def __init__(self, stage: str | None, reason: str):
        super().__init__(reason)
        self.stage, self.reason = stage, reason


# ---------------------------------------------------------------- worker side


@contextlib.contextmanager
def guard(stage: str, timeout_s: float) -> Iterator[None]:
    """Mark ``stage`` as running and, in a worker, end the worker if it runs past ``timeout_s``."""
    if _mark is None:
        yield
        return
    _mark.value = STAGES.index(stage)
    if timeout_s > 0:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _mark.value = IDLE


def test_hook(data: bytes) -> None:
    """Crash or hang on the test inputs, in an isolated process (elsewhere, nothing)."""
    if not (_isolated and data.startswith(b"FACEAUDIT-TEST-HOOK:")):
        return
    if data.startswith(TEST_SEGFAULT):
        ctypes.string_at(0)  # reads address 0: a real SIGSEGV in this process
    elif data.startswith(TEST_HANG):
        time.sleep(3600)
    elif data.startswith(TEST_CRASH_ONCE):  # a decoder that dies once, then works (a flaky start)
        marker = data[len(TEST_CRASH_ONCE) :].decode()
        if not os.path.exists(marker):
            open(marker, "x").close()
            ctypes.string_at(0)


def mark_isolated() -> None:
    """Say that this process decodes in isolation (a subprocess that another framework started
    for decoding, such as Beam's, calls this; IsolatedPool workers do it themselves)."""
    global _isolated
    _isolated = True


def apply_memory_limit(memory_limit_mb: int, on_top: bool = False) -> None:
    """Limit this process's address space to ``memory_limit_mb``; with ``on_top``, to that much
    more than it already uses (a forked process inherits its parent's address space, which may
    be gigabytes already: Beam forks its decode subprocess from the runner's process)."""
    if memory_limit_mb <= 0:
        return
    limit = (memory_limit_mb << 20) + (_address_space() if on_top else 0)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _address_space() -> int:
    """Bytes of address space this process uses now (Linux: the first field of /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def _worker_main(conn: Connection, mark, limits: Limits, initializer, initargs) -> None:
    global _mark
    _mark = mark
    mark_isolated()
    # SIGALRM must end the process: its default action. Ctrl-C is the driver's to handle.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    apply_memory_limit(limits.memory_limit_mb)
    if initializer is not None:
        initializer(*initargs)
    conn.send(("ready", None, None))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        fn, args = task
        try:
            conn.send(("done", True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed to the driver through the future
            conn.send(("done", False, _picklable(exc)))


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception whose class cannot be rebuilt from its args
        return FatalError(f"{type(exc).__name__}: {str(exc)[:300]}")


# ---------------------------------------------------------------- driver side


@dataclass
class _Task:
    future: Future
    fn: Callable
    args: tuple


class _Worker:
    def __init__(self, ctx, limits: Limits, initializer, initargs):
        self.mark = ctx.RawValue("i", IDLE)
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main, args=(child, self.mark, limits, initializer, initargs), daemon=True
        )
        self.process.start()
        child.close()
        self.ready = False
        self.eof = False  # its pipe is closed: it is dying, its sentinel will say how
        self.task: _Task | None = None


class IsolatedPool:
    """``submit(fn, *args) -> Future`` on worker processes under ``limits``; a worker that dies
    is replaced and only its task fails, with ``WorkerDied``. ``fn`` and its arguments must
    pickle; ``initializer(*initargs)`` runs once in each worker, after the limits are set."""

    def __init__(self, workers: int, limits: Limits, initializer=None, initargs: tuple = ()):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        # spawn, not fork: the driver runs threads (HTTP reads, this pool's own), and forking a
        # threaded process is unsafe.
        self._ctx = mp.get_context("spawn")
        self._limits, self._init = limits, (initializer, initargs)
        self._queue: collections.deque[_Task] = collections.deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = False
        self._fatal: FatalError | None = None
        self.deaths = 0
        self._workers = [self._start() for _ in range(workers)]
        self._thread = threading.Thread(target=self._manage, name="isolated-pool", daemon=True)
        self._thread.start()

    def _start(self) -> _Worker:
        return _Worker(self._ctx, self._limits, *self._init)

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        with self._lock:
            if self._fatal is not None:
                future.set_exception(self._fatal)
                return future
            if self._closed:
                raise RuntimeError("the pool is shut down")
            self._queue.append(_Task(future, fn, args))
        self._wake()
        return future

    def shutdown(self, cancel_futures: bool = False) -> None:
        """Stop the workers once their tasks are done; with ``cancel_futures`` (the job is ending
        on an error), drop queued tasks and kill the workers that are busy instead of waiting."""
        with self._lock:
            self._closed = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft().future.cancel()
                for worker in self._workers:
                    if worker.task is not None:
                        worker.process.kill()
        self._wake()
        self._thread.join()
        for worker in self._workers:
            _stop(worker)
        self._wake_r.close()
        self._wake_w.close()

    def pids(self) -> list[int]:
        """The process ids of the live workers (for monitoring, and for tests that kill one)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # The management thread: hands tasks to idle workers and watches for answers and deaths.

    def _manage(self) -> None:
        while True:
            with self._lock:
                if self._closed and not self._queue and not self._busy():
                    return
                self._dispatch()
            by_fd = {w.process.sentinel: w for w in self._workers}
            conns = [w.conn for w in self._workers if not w.eof]
            ready = wait([self._wake_r, *conns, *by_fd])
            for item in ready:
                if item is self._wake_r:
                    self._wake_r.recv(4096)
                elif isinstance(item, Connection):
                    self._receive(next(w for w in self._workers if w.conn is item))
            for item in ready:
                if isinstance(item, int) and by_fd[item] in self._workers:
                    self._died(by_fd[item])

    def _busy(self) -> bool:
        return any(w.task is not None for w in self._workers)

    def _dispatch(self) -> None:
        for worker in self._workers:
            if worker.task is None and self._queue:
                task = self._queue.popleft()
                if not task.future.set_running_or_notify_cancel():
                    continue
                worker.task = task
                try:
                    worker.conn.send((task.fn, task.args))
                except (OSError, ValueError):
                    pass  # the worker is gone; its sentinel reports it

    def _receive(self, worker: _Worker) -> None:
        try:
            kind, ok, value = worker.conn.recv()
        except (EOFError, OSError):
            worker.eof = True  # it died; its sentinel says so
            return
        if kind == "ready":
            worker.ready = True
            return
        task, worker.task = worker.task, None
        if task is None:
            return
        if ok:
            task.future.set_result(value)
        else:
            task.future.set_exception(value)

    def _died(self, worker: _Worker) -> None:
        # An answer sent just before dying is still in the pipe: take it first.
        while worker.task is not None and not worker.eof and _poll(worker.conn):
            self._receive(worker)
        worker.process.join()
        code = worker.process.exitcode
        worker.conn.close()
        self._workers.remove(worker)
        self.deaths += 1
        stage = None if worker.mark.value == IDLE else STAGES[worker.mark.value]
        task, worker.task = worker.task, None
        if not worker.ready:
            error = FatalError(f"a worker process died while starting ({_exit_text(code)})")
            if task is not None:
                task.future.set_exception(error)
            self._fail_all(error)
            return
        if task is not None:
            reason = death_reason(code, stage, self._limits)
            log.warning("a worker process died (%s); it is replaced", reason)
            task.future.set_exception(WorkerDied(stage, reason))
        with self._lock:
            if not self._closed:
                self._workers.append(self._start())

    def _fail_all(self, error: FatalError) -> None:
        with self._lock:
            self._fatal = error
            tasks = [w.task for w in self._workers if w.task] + list(self._queue)
            self._queue.clear()
            self._closed = True
        for worker in self._workers:
            worker.task = None
        for task in tasks:
            if not task.future.done():
                task.future.set_exception(error)


def _poll(conn: Connection) -> bool:
    try:
        return conn.poll()
    except (EOFError, OSError):
        return False


def _stop(worker: _Worker) -> None:
    with contextlib.suppress(OSError, ValueError):
        worker.conn.send(None)
    worker.process.join(timeout=5)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join()
    worker.conn.close()


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {-code}"
    return f"exit code {code}"


def death_reason(code: int | None, stage: str | None, limits: Limits) -> str:
    """A short reason for an image whose worker died with ``code`` while in ``stage``."""
    who = "decoder" if stage == "decode" else "worker"
    if code == -signal.SIGALRM:
        return f"{stage or 'worker'} timed out after {limits.timeout_s:g} s"
    if code == -signal.SIGKILL:
        return f"{who} was killed (signal 9; out of memory?)"
    if code is not None and code < 0:
        return f"{who} crashed (signal {-code})"
    return f"{who} exited unexpectedly (exit code {code})"


# ---------------------------------------------------------------- batches of images


def resolve_batch(
    pool: IsolatedPool, future: Future, fn: Callable[[list[bytes]], list[ImageResult]], batch: Sequence[bytes]
) -> list[ImageResult]:
    """The results of ``fn(batch)`` run on ``pool`` as ``future``. If the batch killed its worker,
    each image is retried alone; an image that kills a worker alone becomes an error row."""
    try:
        return future.result()
    except WorkerDied as died:
        if len(batch) == 1:
            return [died_result(batch[0], died)]
    retries = [(data, pool.submit(fn, [data])) for data in batch]
    return [resolve_batch(pool, f, fn, [data])[0] for data, f in retries]


def died_result(data: bytes, died: WorkerDied) -> ImageResult:
    error = RecordError(died.stage or "detect", died.reason)
    sha = hashlib.sha256(data).hexdigest()
    return ImageResult(image_sha256=sha, status="error", error_stage=error.stage, error=error.reason)
