"""Fuzz the name check and the URI-list resolver (atheris, in a subprocess, for a bounded time).

FACEAUDIT_FUZZ_PATHS_SECONDS (default 10) sets the time; it passes when libFuzzer finds no input
that breaks a property of tests/fuzz/fuzz_paths.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuzz import run_fuzzer

atheris = pytest.importorskip("atheris", reason="the fuzz test needs atheris (the dev extra)")

TARGET = Path(__file__).with_name("fuzz_paths.py")
SECONDS = int(os.environ.get("FACEAUDIT_FUZZ_PATHS_SECONDS", "10"))
SEEDS = ["run-1", "../x", "a/b", "..", ".hidden", "x" * 129, "imgs/../../etc/passwd", "file:///etc/hostname"]


def test_names_and_uri_entries_survive_fuzzing(tmp_path):
    seeds = tmp_path / "corpus"
    seeds.mkdir()
    for i, seed in enumerate(SEEDS):
        (seeds / f"seed-{i}").write_bytes(seed.encode())
    assert run_fuzzer(TARGET, seeds, SECONDS, "-timeout=10", "-max_len=512") > len(SEEDS)
