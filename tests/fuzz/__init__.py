"""Fuzz tests: each runs an atheris (libFuzzer) target in a subprocess for a bounded time."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def run_fuzzer(target: Path, seeds: Path, seconds: int, *flags: str) -> int:
    """Run ``target`` on the corpus folder ``seeds`` for ``seconds``; fail the test on any finding
    (a crash, a timeout, an out-of-memory: libFuzzer saves the input beside ``seeds``) and return
    how many inputs it tried. libFuzzer ends its process on the first finding, hence the subprocess."""
    artifacts = seeds.parent
    command = [
        sys.executable,
        str(target),
        f"-max_total_time={seconds}",
        *flags,
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        str(seeds),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=seconds + 240)
    log = proc.stdout + proc.stderr
    found = ("crash-", "timeout-", "oom-")
    findings = sorted(p.name for p in artifacts.iterdir() if p.name.startswith(found))
    assert proc.returncode == 0 and not findings, f"{findings}\n{log[-4000:]}"
    runs = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert runs, log[-2000:]
    print(f"atheris: {runs.group(1)} inputs in {runs.group(2)} s")
    return int(runs.group(1))
