"""One writer per run, and run ids that cannot leave ``<out>`` (docs/reliability.md, docs/security.md).

The attacks these tests replay:

* ``--run-id ../../victim`` deleted a file outside ``--out`` and wrote the run there;
* a second ingest on a running run id, with another data set, deleted the first one's committed
  shards as "not in the plan"; the first then exited 0 with a manifest of 2 of its 12 images.

Jobs are real ``python -m pipelines`` processes on small real photos. Nothing here waits on a
clock: job A is held inside its run by an HTTP server of the test that answers A's one http://
image only when the test says so, so B starts while A holds the run, deterministically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.core import orphans, storage
from pipelines.core.config import JobConfig
from pipelines.core.faults import KILL_AT
from pipelines.core.locks import LockHeld
from pipelines.core.names import BadName
from pipelines.core.run import RunLock, hold_run
from pipelines.core.writer import RUN_LOCK, RUN_PLAN, read_manifest
from tests.helpers import (
    REPO,
    image_rows,
    make_job,
    manifest,
    run_faceaudit,
    start_faceaudit,
    write_small_copies,
)

EXIT_LOCKED = 3
GUARD_S = 300  # only ever reached when the code under test is broken: then the test fails, not hangs


@pytest.fixture(scope="module")
def photos(tmp_path_factory, faces_dir) -> list[Path]:
    """14 small real photos: 12 for job A, 2 for job B."""
    folder = tmp_path_factory.mktemp("lock-photos")
    write_small_copies(sorted(faces_dir.glob("img*.jpg"))[:14], folder, 240)
    return sorted(folder.iterdir())


def folder_of(tmp_path: Path, name: str, files: list[Path]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def tree(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def shard_files(run: Path) -> dict[str, tuple[int, str]]:
    """Every committed shard of ``run``: its inode (a rewrite or a delete changes it) and sha256."""
    return {
        p.relative_to(run).as_posix(): (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in run.glob("*/part-*.parquet")
    }


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


# ---------------------------------------------------------------- run ids are names, not paths

BAD_IDS = ["../../victim", "../victim", "a/b", "/tmp/abs", ".hidden", "x..y", "..", "", "a b", "ä", "x" * 129]


@pytest.mark.parametrize("run_id", BAD_IDS)
def test_a_bad_run_id_is_refused_before_any_file_is_touched(run_id, tmp_path, photos):
    data = folder_of(tmp_path, "data", photos[:1])
    victim = tmp_path / "victim"
    (victim / "images").mkdir(parents=True)
    (victim / "images" / "part-old.parquet").write_bytes(b"not in anyone's plan")
    (victim / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    result = cli("ingest", "--dataset", f"d={data}", "--out", str(tmp_path / "out"), "--run-id", run_id)
    assert result.exit_code == 2, result.output
    assert "run id" in result.output and "is not allowed" in result.output
    assert result.output.strip().count("\n") == 0, "one line, not a traceback"
    assert tree(tmp_path) == before, "a file was created or deleted"


def test_a_bad_run_id_in_a_job_file_is_refused(tmp_path, photos):
    data = folder_of(tmp_path, "data", photos[:1])
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("mine")
    job = tmp_path / "job.yaml"
    job.write_text(
        f"datasets: [{{name: d, source: '{data}'}}]\nout: '{tmp_path / 'out'}'\nrun_id: ../../victim\n"
    )
    before = tree(tmp_path)
    result = cli("ingest", "--config", str(job))
    assert result.exit_code == 2 and "run id '../../victim' is not allowed" in result.output
    assert tree(tmp_path) == before


def test_the_attack_through_a_real_process(tmp_path, photos):
    """The reported attack as it was run: a separate process, a victim file beside --out."""
    data = folder_of(tmp_path, "data", photos[:1])
    out = tmp_path / "a" / "out"
    victim = tmp_path / "a" / "victim"
    (victim / "images").mkdir(parents=True)
    (victim / "images" / "part-planted.parquet").write_bytes(b"victim")
    before = tree(tmp_path)
    proc = run_faceaudit(["ingest", "--dataset", f"d={data}", "--out", str(out), "--run-id", "../../victim"])
    err = proc.stderr
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == [
        "error: run id '../../victim' is not allowed: use 1 to 128 of A-Z a-z 0-9 . _ -, starting with "
        "a letter or digit, without '..'"
    ]
    assert tree(tmp_path) == before


def test_a_run_id_read_back_from_a_manifest_is_checked(tmp_path):
    run = tmp_path / "runs" / "ok"
    run.mkdir(parents=True)
    (run / "_manifest.json").write_text('{"run_id": "../../elsewhere", "shards": []}')
    with pytest.raises(BadName, match="run id"):
        read_manifest(str(run))


# ---------------------------------------------------------------- one writer per run


class HeldImage:
    """An HTTP server on 127.0.0.1 whose one image is answered only once ``release`` is set;
    ``asked`` is set when the request arrives, so the test knows where its client is."""

    def __init__(self, data: bytes):
        self.data, self.asked, self.release = data, threading.Event(), threading.Event()
        held = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                held.asked.set()
                held.release.wait(GUARD_S)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(held.data)))
                self.end_headers()
                self.wfile.write(held.data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/held.jpg"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def wait_for(what: str, ready, proc: subprocess.Popen) -> None:
    """Poll until ``ready()``; fail (never pass) if the job ends first or the guard runs out."""
    deadline = time.monotonic() + GUARD_S
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"job A ended before {what}: {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"job A never got to {what}"
        time.sleep(0.05)


def test_a_second_ingest_on_a_running_run_id_exits_3_and_the_first_completes(tmp_path, photos):
    """A (12 images, 4 units of 3) is held while reading its 8th image, after committing its
    first two units; B starts on the same run id with another data set. B must stop with exit 3
    naming A, delete nothing; A must then finish with all 12 images."""
    mine, theirs = photos[:11], photos[12:14]
    a_data = folder_of(tmp_path, "a-data", mine)
    held = HeldImage(photos[11].read_bytes())
    entries = [p.name for p in mine]
    entries.insert(7, held.url)  # unit 2's second image: units 0 and 1 commit before A blocks
    (a_data / "list.txt").write_text("\n".join(entries) + "\n")
    out = tmp_path / "out"
    job = tmp_path / "a.yaml"
    job.write_text(
        f"datasets: [{{name: mine, source: '{a_data / 'list.txt'}'}}]\nout: '{out}'\nrun_id: shared\n"
        "images_per_shard: 3\nworkers: 1\nmax_in_flight: 1\nprogress: false\n"
        "http: {timeout_s: 600, retries: 0, allow_networks: [127.0.0.0/8]}\n"
    )
    run = out / "runs" / "shared"
    a = start_faceaudit(["ingest", "--config", str(job)])
    try:
        wait_for("its http image", held.asked.is_set, a)
        wait_for("two committed units", lambda: len(list(run.glob("images/part-*.parquet"))) >= 2, a)
        committed_by_a = shard_files(run)

        b_data = folder_of(tmp_path, "b-data", theirs)
        b_args = ["ingest", "--dataset", f"theirs={b_data}", "--out", str(out), "--run-id", "shared"]
        b = run_faceaudit(b_args, timeout=GUARD_S)
        b_err = b.stderr
        assert b.returncode == EXIT_LOCKED, b_err
        assert f"held by {socket.gethostname()}:{a.pid}" in b_err
        assert "ingest run shared is in progress" in b_err
        assert shard_files(run) == committed_by_a, "B changed or deleted A's shards"

        held.release.set()
        a_out, a_err = a.communicate(timeout=GUARD_S)
        assert a.returncode == 0, a_err
    finally:
        held.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(a.pid, signal.SIGKILL)
    body = manifest(run)
    assert body["counts"]["images"] == 12
    assert set(body["counts"]["per_dataset"]) == {"mine"}
    rows = image_rows(run)
    assert len(rows) == 12 and {r["status"] for r in rows} != {"error"}
    assert sorted(Path(r["source_uri"]).name for r in rows) == sorted(
        [*entries[:7], "held.jpg", *entries[8:]]
    )
    assert {s["file"] for s in body["shards"]} == set(shard_files(run))
    after = shard_files(run)
    assert all(after[name] == found for name, found in committed_by_a.items()), (
        "A's early shards were rewritten"
    )
    assert not (run / RUN_LOCK).exists()  # removed when A let go


def test_resuming_a_run_with_another_plan_exits_3_and_deletes_nothing(tmp_path, photos):
    a_data = folder_of(tmp_path, "a-data", photos[:3])
    out = tmp_path / "out"
    common = ["--out", str(out), "--run-id", "r", "--workers", "1", "--no-progress", "--images-per-shard"]
    killed = run_faceaudit(
        ["ingest", "--dataset", f"mine={a_data}", *common, "1"], env={KILL_AT: "run.before_manifest"}
    )
    err = killed.stderr
    assert killed.returncode == -signal.SIGKILL, err
    run = out / "runs" / "r"
    committed = shard_files(run)
    assert len(committed) == 6 and (run / RUN_PLAN).is_file() and not (run / "_manifest.json").exists()

    b_data = folder_of(tmp_path, "b-data", photos[3:5])
    other = cli("ingest", "--dataset", f"theirs={b_data}", *common, "1")
    assert other.exit_code == EXIT_LOCKED, other.output
    assert "run r was started with another plan (data sets mine; this job: theirs)" in other.output
    assert "give a new --run-id" in other.output and other.output.strip().count("\n") == 0

    resized = cli("ingest", "--dataset", f"mine={a_data}", *common, "2")
    assert resized.exit_code == EXIT_LOCKED and "1 images per shard; this job: 2" in resized.output

    (a_data / "new.jpg").write_bytes(photos[5].read_bytes())
    grown = cli("ingest", "--dataset", f"mine={a_data}", *common, "1")
    assert grown.exit_code == EXIT_LOCKED and "its listing changed" in grown.output
    (a_data / "new.jpg").unlink()
    assert shard_files(run) == committed, "a refused attempt changed the run"

    resumed = cli("ingest", "--dataset", f"mine={a_data}", *common, "1")
    assert resumed.exit_code == 0, resumed.output
    assert manifest(run)["counts"]["images"] == 3
    assert shard_files(run) == committed  # every unit was done: nothing rewritten

    # a committed run names its plan too: another data set on it is refused, the same one is a no-op
    again = cli("ingest", "--dataset", f"theirs={b_data}", *common, "1")
    assert again.exit_code == EXIT_LOCKED and "started with another plan" in again.output
    same = cli("ingest", "--dataset", f"mine={a_data}", *common, "1")
    assert same.exit_code == 0 and "nothing was done" in same.output


def job_for(tmp_path: Path, photos: list[Path], engine: str = "local") -> JobConfig:
    data = tmp_path / "data"
    if not data.exists():
        folder_of(tmp_path, "data", photos[:1])
    return make_job(tmp_path / "out", ("d", data), run_id="locked", engine=engine)


@pytest.mark.parametrize("engine", ["local", "ray", "beam"])
def test_every_engine_takes_the_run_lock_before_anything_else(engine, tmp_path, photos):
    if engine == "beam":
        pytest.importorskip("apache_beam")
    from pipelines.engines import run_job

    job = job_for(tmp_path, photos, engine)
    run = tmp_path / "out" / "runs" / "locked"
    with RunLock(str(run), "locked"):
        before = tree(tmp_path / "out")
        with pytest.raises(LockHeld, match=f"held by {socket.gethostname()}:{os.getpid()} since"):
            run_job(job)
        assert tree(tmp_path / "out") == before


def test_the_local_lock_names_its_holder_and_goes_with_it(tmp_path, photos):
    run = tmp_path / "out" / "runs" / "r"
    lock = RunLock(str(run), "r")
    with lock:
        assert oct((run / RUN_LOCK).stat().st_mode & 0o777) == oct(0o600)
        assert orphans.run_writer_alive(str(run))
        with pytest.raises(LockHeld, match=f"ingest run r is in progress .held by {socket.gethostname()}:"):
            RunLock(str(run), "r").acquire()
    assert not (run / RUN_LOCK).exists() and not orphans.run_writer_alive(str(run))

    # a holder that dies (SIGKILL: no clean-up of its own) leaves a file nobody holds
    code = (
        "import sys, time; from pipelines.core.run import RunLock; "
        f"RunLock({str(run)!r}, 'r').acquire(); print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f":{holder.pid} since"):
            RunLock(str(run), "r").acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (run / RUN_LOCK).exists() and not orphans.run_writer_alive(str(run))
    with RunLock(str(run), "r"):
        pass


def test_gc_leaves_a_locked_run_alone(tmp_path):
    run = tmp_path / "out" / "runs" / "r"
    (run / "images").mkdir(parents=True)
    (run / "images" / "part-u-000000.parquet").write_bytes(b"shard")
    old = time.time() - 10 * 86400
    os.utime(run / "images" / "part-u-000000.parquet", (old, old))
    with RunLock(str(run), "r"):
        assert orphans.run_orphans(str(run), older_than_s=0) == []
    assert [o.uri for o in orphans.run_orphans(str(run), older_than_s=0)] == [str(run)]


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    run = tmp_path / "runs" / "r"
    read, write = os.pipe()
    with RunLock(str(run), "r"):
        pid = os.fork()
        if pid == 0:  # the child outlives the parent's hold on the lock
            os.close(write)
            os.read(read, 1)
            os._exit(0)
        os.close(read)
    try:
        with RunLock(str(run), "r"):  # the child lives on, and did not keep the lock
            pass
    finally:
        os.close(write)
        os.waitpid(pid, 0)


def test_a_plan_is_persisted_once_and_the_lock_is_held_for_the_block(tmp_path, photos):
    job = job_for(tmp_path, photos)
    with hold_run(job) as state:
        assert not state.committed and state.lock is not None
        assert (Path(state.uri) / RUN_PLAN).is_file()
        with pytest.raises(LockHeld):
            with hold_run(job):
                pass
    assert not (Path(state.uri) / RUN_LOCK).exists()


def test_the_run_lock_on_gcs(gcs_emulator):
    bucket = gcs_emulator.make_bucket("run-lock")
    run = storage.join(bucket, "out", "runs", "r")
    with RunLock(run, "r"):
        assert storage.exists(storage.join(run, RUN_LOCK))
        assert orphans.run_writer_alive(run)
        with pytest.raises(
            LockHeld, match=f"ingest run r is in progress .held by {socket.gethostname()}:{os.getpid()}"
        ):
            RunLock(run, "r").acquire()
    assert not storage.exists(storage.join(run, RUN_LOCK)) and not orphans.run_writer_alive(run)
