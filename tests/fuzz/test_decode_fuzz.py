"""Fuzz smoke test of the decoder: atheris for a bounded time, seeded with the hostile corpus.

It runs in a subprocess (libFuzzer ends its process on the first finding) for
FACEAUDIT_FUZZ_SECONDS (default 20, as in ``make test``; ``make fuzz`` runs it for 300) with a
per-input timeout and an RSS limit, and passes when libFuzzer reports neither a crash, a hang, an
out-of-memory nor any exception but RecordError.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuzz import run_fuzzer
from tests.hostile import corpus, scan_bomb_jpeg

atheris = pytest.importorskip("atheris", reason="the fuzz test needs atheris (the dev extra)")

TARGET = Path(__file__).with_name("fuzz_decode.py")
SECONDS = int(os.environ.get("FACEAUDIT_FUZZ_SECONDS", "20"))
PER_INPUT_TIMEOUT_S = 10
RSS_LIMIT_MB = 2048


def test_decoder_survives_fuzzing(tmp_path):
    seeds = tmp_path / "corpus"
    seeds.mkdir()
    for case, data in corpus():
        if data:
            (seeds / case.filename).write_bytes(data)
    (seeds / "scans.jpg").write_bytes(scan_bomb_jpeg())
    limits = (f"-timeout={PER_INPUT_TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}", "-max_len=65536")
    tried = run_fuzzer(TARGET, seeds, SECONDS, *limits)
    assert tried > len(corpus())  # it fuzzed, beyond replaying the seeds
