"""Fuzz the name check and the URI-list resolver (atheris, in a subprocess, for a bounded time).

FACEAUDIT_FUZZ_PATHS_SECONDS (default 10) sets the time; it passes when libFuzzer finds no input
that breaks a property of tests/fuzz/fuzz_paths.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

atheris = pytest.importorskip("atheris", reason="the fuzz test needs atheris (the dev extra)")

TARGET = Path(__file__).with_name("fuzz_paths.py")
SECONDS = int(os.environ.get("FACEAUDIT_FUZZ_PATHS_SECONDS", "10"))
SEEDS = ["run-1", "../x", "a/b", "..", ".hidden", "x" * 129, "imgs/../../etc/passwd", "file:///etc/hostname"]


def test_names_and_uri_entries_survive_fuzzing(tmp_path):
    seeds = tmp_path / "corpus"
    seeds.mkdir()
    for i, seed in enumerate(SEEDS):
        (seeds / f"seed-{i}").write_bytes(seed.encode())
    command = [
        sys.executable,
        str(TARGET),
        f"-max_total_time={SECONDS}",
        "-timeout=10",
        "-max_len=512",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
        str(seeds),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=SECONDS + 120)
    log = proc.stdout + proc.stderr
    findings = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not findings, f"{findings}\n{log[-4000:]}"
    runs = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert runs and int(runs.group(1)) > len(SEEDS), log[-2000:]
