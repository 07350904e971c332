"""Fuzz smoke test of the decoder: atheris for a bounded time, seeded with the hostile corpus.

It runs in a subprocess (libFuzzer ends its process on the first finding) for
FACEAUDIT_FUZZ_SECONDS (default 20, as in ``make test``; ``make fuzz`` runs it for 300) with a
per-input timeout and an RSS limit, and passes when libFuzzer reports neither a crash, a hang, an
out-of-memory nor any exception but RecordError.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    n_seeds = len(list(seeds.iterdir()))  # libFuzzer adds what it finds to this folder
    command = [
        sys.executable,
        str(TARGET),
        f"-max_total_time={SECONDS}",
        f"-timeout={PER_INPUT_TIMEOUT_S}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        "-max_len=65536",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
        str(seeds),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=SECONDS + 240)
    log = proc.stdout + proc.stderr
    findings = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not findings, f"{findings}\n{log[-4000:]}"
    runs = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert runs, log[-2000:]
    print(f"atheris: {runs.group(1)} inputs in {runs.group(2)} s, from {n_seeds} seeds")
    assert int(runs.group(1)) > len(corpus())  # it fuzzed, beyond replaying the seeds
