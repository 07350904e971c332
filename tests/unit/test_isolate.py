"""Isolated decode workers: a real segfault, a real hang, a real out-of-memory and a real SIGKILL
each cost one image, and the pool goes on with a fresh worker. No model is loaded: the workers
run ``decode_one`` only, so each test takes about a second."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipelines.core import isolate
from pipelines.core.config import DecodeConfig, ModelConfig
from pipelines.core.errors import STAGES, FatalError
from pipelines.core.isolate import IsolatedPool, Limits, WorkerDied, resolve_batch
from pipelines.core.stages import decode_one
from tests.hostile import corpus, png_bytes

GOOD = next(data for case, data in corpus() if case.filename == "photo.bmp")


def decode_batch(batch: list[bytes], timeout_s: float = 0.0) -> list:
    """What a worker runs: decode each image (no model), results in order."""
    return [decode_one(data, DecodeConfig(timeout_s=timeout_s, test_hooks=True))[0] for data in batch]


def _fail_to_start() -> None:
    os._exit(3)


def test_a_segfault_fails_one_image_and_the_pool_goes_on():
    pool = IsolatedPool(1, Limits(timeout_s=10))
    try:
        batch = [GOOD, isolate.TEST_SEGFAULT, GOOD]
        results = resolve_batch(pool, pool.submit(decode_batch, batch), decode_batch, batch)
        assert [r.status for r in results] == ["ok", "error", "ok"]
        assert (results[1].error_stage, results[1].error) == ("decode", "decoder crashed (signal 11)")
        assert pool.deaths == 2  # the batch, then the image alone
        assert pool.submit(decode_batch, [GOOD]).result()[0].status == "ok"  # a fresh worker
    finally:
        pool.shutdown()


def test_a_hang_is_ended_by_the_timeout():
    pool = IsolatedPool(1, Limits(timeout_s=1))
    try:
        started = time.monotonic()
        future = pool.submit(decode_batch, [isolate.TEST_HANG], 1.0)
        with pytest.raises(WorkerDied) as died:
            future.result(timeout=30)
        assert time.monotonic() - started < 15
        assert (died.value.stage, died.value.reason) == ("decode", "decode timed out after 1 s")
    finally:
        pool.shutdown()


def test_memory_past_the_limit_is_an_error_row_not_a_dead_machine():
    # A header claiming 7000x7000 RGB (within max_pixels) and hardly any data: Pillow allocates the
    # image (196 MB) before reading pixels, a real allocation failure under a 300 MB address space.
    bomb = png_bytes(7000, 7000, 8, 2, bytes(1024))
    pool = IsolatedPool(1, Limits(memory_limit_mb=300, timeout_s=30))
    try:
        result = pool.submit(decode_batch, [bomb, GOOD]).result(timeout=60)
        assert (result[0].status, result[0].error) == ("error", "decoder ran out of memory")
        assert result[1].status == "ok"  # the same worker, still alive
        assert pool.deaths == 0
    finally:
        pool.shutdown()


def test_a_worker_killed_from_outside_fails_its_image_only():
    pool = IsolatedPool(1, Limits())
    try:
        pool.submit(decode_batch, [GOOD]).result(timeout=60)  # started
        future = pool.submit(decode_batch, [isolate.TEST_HANG])
        _wait_for_decode(pool)
        os.kill(pool.pids()[0], signal.SIGKILL)
        with pytest.raises(WorkerDied) as died:
            future.result(timeout=30)
        assert died.value.reason.startswith("decoder was killed (signal 9")
        assert pool.submit(decode_batch, [GOOD]).result(timeout=60)[0].status == "ok"
    finally:
        pool.shutdown()


def test_a_worker_that_cannot_start_fails_the_job():
    pool = IsolatedPool(1, Limits(), _fail_to_start)
    try:
        with pytest.raises(FatalError, match="died while starting"):
            pool.submit(decode_batch, [GOOD]).result(timeout=60)
    finally:
        pool.shutdown()


def test_hooks_do_nothing_outside_a_worker():
    result, image = decode_one(isolate.TEST_SEGFAULT, DecodeConfig(test_hooks=True))
    assert (result.status, result.error) == ("error", "not an allowed image format") and image is None


def _wait_for_decode(pool: IsolatedPool) -> None:
    """Until the only worker is inside the decode stage (read from its shared stage mark)."""
    deadline = time.monotonic() + 30
    while pool._workers[0].mark.value != STAGES.index("decode"):  # noqa: SLF001 - test-only peek
        assert time.monotonic() < deadline, "the worker never started decoding"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("model", "limited"),
    [
        (ModelConfig(), True),
        (ModelConfig(providers=["cuda", "cpu"]), False),  # dlib's networks on ORT's CUDA provider
        (ModelConfig(runtime="dlib", providers=["cuda"]), True),  # dlib itself never touches CUDA
        (ModelConfig(backend="insightface", providers=["tensorrt", "cuda"]), False),
        (ModelConfig(backend="insightface"), True),
    ],
)
def test_gpu_workers_get_no_address_space_limit(model, limited):
    limits = isolate.limits_for(DecodeConfig(memory_limit_mb=3000), model)
    assert limits.memory_limit_mb == (3000 if limited else 0)
