"""Small helpers shared by tests: the repository, jobs, CLI subprocesses; read a run back, sort rows."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

if TYPE_CHECKING:
    from pipelines.core.config import JobConfig

REPO = Path(__file__).resolve().parents[1]
CLI = ("-m", "pipelines")  # what follows the interpreter in a CLI run: `python -m pipelines ARGS`


def make_job(out: str | Path, *datasets: tuple[str, str | Path], **settings) -> JobConfig:
    """A job of the data sets ``(name, source)`` writing under ``out``, without a progress bar;
    ``settings`` are the other JobConfig fields (their defaults otherwise)."""
    from pipelines.core.config import DatasetSpec, JobConfig

    specs = [DatasetSpec(name=name, source=str(source)) for name, source in datasets]
    return JobConfig(datasets=specs, out=str(out), **{"progress": False, **settings})


def cli_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its kill points (pipelines.core.faults: a job never
    inherits one by accident), with ``env`` on top."""
    from pipelines.core.faults import KILL_AT, KILL_ONCE

    environ = {k: v for k, v in os.environ.items() if k not in (KILL_AT, KILL_ONCE)}
    environ.update(env or {})
    return environ


def start_faceaudit(
    args: Sequence[str | os.PathLike],
    *,
    cwd: str | Path = REPO,
    env: Mapping[str, str] | None = None,
    entry: Sequence[str] = CLI,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
) -> subprocess.Popen:
    """``python -m pipelines ARGS`` started, not waited for (for a test that works beside a running
    job): text pipes unless told otherwise, in a session of its own so that a SIGKILL of its
    group reaches its workers too. ``env`` as in cli_environment; ``entry`` replaces ``-m pipelines``
    (e.g. ``-c CODE``)."""
    return subprocess.Popen(
        [sys.executable, *entry, *map(str, args)],
        cwd=cwd,
        env=cli_environment(env),
        stdout=stdout,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


class Finished(subprocess.CompletedProcess):
    """A CLI job run to its end: ``returncode``, ``stdout`` and ``stderr`` (text), and the ``pid``
    it ran as (a kill point's marker names the pid of the process it killed)."""

    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str, pid: int) -> None:
        super().__init__(args, returncode, stdout, stderr)
        self.pid = pid


def run_faceaudit(
    args: Sequence[str | os.PathLike],
    *,
    cwd: str | Path = REPO,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    entry: Sequence[str] = CLI,
) -> Finished:
    """``python -m pipelines ARGS`` in a subprocess, to its end; whatever its exit, it is the test's
    to assert. Output goes to files, not pipes (a SIGKILLed job's surviving workers may hold a pipe
    open for good), and whatever the job leaves running in its session is killed when it ends, as
    the loss of its machine would. A job still running after ``timeout`` seconds is killed and the
    test fails, naming the command and the end of its stderr. ``cwd``, ``env`` and ``entry`` as
    in start_faceaudit."""
    with tempfile.TemporaryDirectory(prefix="faceaudit-cli-") as tmp:
        out_path, err_path = Path(tmp, "stdout"), Path(tmp, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = start_faceaudit(args, cwd=cwd, env=env, entry=entry, stdout=out, stderr=err)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            timed_out = proc.returncode is None
            proc.wait()
        stdout = out_path.read_bytes().decode("utf-8", "replace")
        stderr = err_path.read_bytes().decode("utf-8", "replace")
    if timed_out:
        command = shlex.join(["faceaudit", *map(str, args)])
        pytest.fail(
            f"`{command}` (in {cwd}) was still running after {timeout} s and was killed; "
            f"its stderr ends:\n{stderr[-3000:]}",
            pytrace=False,
        )
    return Finished(proc.args, proc.returncode, stdout, stderr, proc.pid)


def read_table(run: str | Path, table: str) -> pa.Table:
    parts = sorted((Path(run) / table).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None


def manifest(run: str | Path) -> dict:
    return json.loads((Path(run) / "_manifest.json").read_text())


def image_rows(run) -> list[dict]:
    rows = read_table(run, "images").drop(["run_id"]).to_pylist()
    return sorted(rows, key=lambda r: (r["dataset"], r["source_uri"]))


def face_rows(run) -> list[dict]:
    rows = read_table(run, "faces").drop(["run_id"]).to_pylist()
    return sorted(rows, key=lambda r: r["face_id"])


def largest_face_embeddings(run) -> dict[str, np.ndarray]:
    """File name -> embedding of its largest face, from the Parquet output."""
    faces = read_table(run, "faces").to_pylist()
    best: dict[str, tuple[float, np.ndarray]] = {}
    for row in faces:
        x1, y1, x2, y2 = row["bbox"]
        area = (x2 - x1) * (y2 - y1)
        name = Path(row["source_uri"]).name
        if name not in best or area > best[name][0]:
            best[name] = (area, np.asarray(row["embedding"], dtype=np.float32))
    return {name: emb for name, (_, emb) in best.items()}


def write_small_copies(photos, folder: Path, max_side: int, quality: int = 90) -> None:
    """Upright JPEG copies of ``photos`` in ``folder``, no longer than ``max_side``: fast runs."""
    import io

    from PIL import Image, ImageOps

    for photo in photos:
        image = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
        image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        (Path(folder) / Path(photo).name).write_bytes(buffer.getvalue())


@contextlib.contextmanager
def kill_once(point: str, marker: Path) -> Iterator[None]:
    """For the code inside: the first process to reach kill point ``point`` (pipelines.core.faults)
    dies by SIGKILL and leaves ``marker``; the engines hand the variables to their workers."""
    from pipelines.core.faults import KILL_AT, KILL_ONCE

    # Only these two: mock.patch.dict would restore all of os.environ, dropping what code inside
    # set for good (ray.init puts its cluster's auth token there for later drivers to find).
    saved = {key: os.environ.get(key) for key in (KILL_AT, KILL_ONCE)}
    os.environ.update({KILL_AT: point, KILL_ONCE: str(marker)})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Debian's chromium, driven by Playwright with executable_path (Playwright's own browser download
# cannot work here); the flags keep it off the network it cannot reach.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The marks of a module of browser tests: skipped, saying what to install, without chromium or
# Playwright.
NEEDS_BROWSER = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (Debian: apt-get install -y chromium)"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="playwright is missing (pip install playwright; it drives /usr/bin/chromium)",
    ),
]


def rebuild_config(root: Path, **settings):
    """A small, quick rebuild of the registry ``<root>/registry`` into ``<root>/work`` and
    ``<root>/index`` (one worker, 4 images per shard, decoding in-process); ``settings`` override."""
    from pipelines.core.config import DecodeConfig
    from pipelines.rebuild.config import RebuildConfig

    base = dict(
        registry=str(root / "registry"),
        work=str(root / "work"),
        index=str(root / "index"),
        workers=1,
        progress=False,
        images_per_shard=4,
        decode=DecodeConfig(isolate=False),
    )
    return RebuildConfig(**{**base, **settings})
