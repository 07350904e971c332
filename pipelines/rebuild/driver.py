"""``faceaudit rebuild``: bring the index up to date with the registry, with the least work.

Steps (each a small function, so that other concerns such as erasure can hook in between):

1. ``lock``: one rebuild at a time (``lock.py``).
2. ``read_current``: the version CURRENT names and what it was built from (``rebuild.sources``).
3. ``plan``: registry + fingerprints against it -> data sets to ingest, keep and drop.
4. ``ingest``: one run of the new and changed data sets; images whose bytes the current version's
   runs already embedded with the same model get ``images`` rows but are not decoded again. The
   run id is a digest of what it ingests, so a rebuild killed mid-ingest resumes that run.
5. ``build``: the next version from the live (run, data set) pairs, extending or retraining
   (``indexing/extend.py``); manifest written, CURRENT not yet moved.
6. ``check``: open the version (every sha256), counts, data sets, recall. Only then
7. ``publish``: CURRENT moves (compare-and-swap), then ``gc`` and the ``report``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

from indexing import bundle, erase, prune
from indexing import runs as runsmod
from indexing.erase import read_bundle_manifest
from indexing.errors import IntegrityError
from indexing.extend import VersionOptions, VersionResult, build_version, discard, write_manifest
from indexing.options import BuildOptions
from indexing.runners import shard_runner
from indexing.search import open_index
from pipelines.core import catalog, erasure, orphans, storage
from pipelines.core.config import DatasetSpec, JobConfig, ModelConfig
from pipelines.core.errors import ConfigError, FaceauditError, FatalError
from pipelines.core.faults import checkpoint
from pipelines.core.locks import ExpiringLock, sweep_lock
from pipelines.core.records import ImageResult
from pipelines.core.stages import RESULT_COLUMNS, result_from_image_row
from pipelines.core.writer import is_committed
from pipelines.engines import run_job

from . import report
from .config import RebuildConfig
from .fingerprint import fingerprint
from .plan import Delta, Source, current_sources, live_pairs, plan_delta, record_sources

log = logging.getLogger(__name__)
KNOWN_STATUSES = ("ok", "no_face")  # results worth reusing; errors are tried again


@dataclass(slots=True)
class Rebuild:
    """What the steps hand each other, and what the report shows."""

    config: RebuildConfig
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    current: dict | None = None
    current_folder: str | None = None
    model: ModelConfig = field(default_factory=lambda: ModelConfig())
    registry: dict[str, DatasetSpec] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why a rebuild does not fetch it
    fingerprints: dict[str, str] = field(default_factory=dict)
    delta: Delta | None = None
    run_uri: str | None = None
    run_report: dict | None = None
    analyzed: int | None = None
    sources: dict[str, Source] = field(default_factory=dict)
    version: VersionResult | None = None
    gc: prune.GcResult | None = None
    status: str = "running"
    steps: dict[str, float] = field(default_factory=dict)
    report_uri: str | None = None


def rebuild(config: RebuildConfig) -> Rebuild:
    """Run every step under the lock; raises LockHeld when another rebuild holds it."""
    state = Rebuild(config)
    with ExpiringLock(config.index, config.lock_ttl_s) as lock:
        checkpoint("rebuild.locked")
        pause_point("rebuild.locked")
        try:
            run_steps(state, lock)
        except FaceauditError as exc:
            state.status = f"failed: {exc}"
            write_failure_report(state)
            raise
        _step(state, "report", write_rebuild_report)
    return state


def run_steps(state: Rebuild, lock: ExpiringLock) -> None:
    _step(state, "read_current", read_current)
    _step(state, "plan", plan)
    assert state.delta is not None
    if state.delta.empty and state.current is not None:
        state.status = "up to date"
    else:
        _step(state, "ingest", ingest)
        if state.status == "running":  # else a launched ingest job is still to finish
            # erasure sweeps wait meanwhile: they rewrite the run shards the build reads
            with sweep_lock(state.config.index, holder="a rebuild's index build"):
                _step(state, "build", build)
                _step(state, "check", check)
                lock.check()
                _step(state, "publish", publish)
    _step(state, "gc", collect_garbage)


def write_failure_report(state: Rebuild) -> None:
    """A failed rebuild still leaves a report saying how far it got (never hiding the failure)."""
    try:
        write_rebuild_report(state)
    except (OSError, FaceauditError, ValueError) as exc:
        log.warning("could not write the failure report: %s", exc)


PAUSE_AT = "FACEAUDIT_PAUSE_AT"  # "point:/path/to/file": wait there until the file exists (tests)
PAUSE_MAX_S = 120


def pause_point(name: str) -> None:
    """For the two-rebuilds test: hold the lock at ``name`` until a file appears (at most 2 minutes)."""
    point, _, path = os.environ.get(PAUSE_AT, "").partition(":")
    if point != name or not path:
        return
    deadline = time.monotonic() + PAUSE_MAX_S
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def _step(state: Rebuild, name: str, fn) -> None:
    began = time.perf_counter()
    fn(state)
    state.steps[name] = round(time.perf_counter() - began, 2)


# ---------------------------------------------------------------- steps


def read_current(state: Rebuild) -> None:
    """The version CURRENT names, if any (its manifest checked against its checksum)."""
    index = state.config.index
    if not storage.exists(storage.join(index, bundle.CURRENT)):
        return
    folder, _ = bundle.resolve(index)
    state.current = bundle.parse_manifest(storage.read_bytes(storage.join(folder, bundle.MANIFEST)))
    state.current_folder = folder


def plan(state: Rebuild) -> None:
    """Registry and fingerprints against the current version; a new model starts from scratch."""
    cfg = state.config
    state.model = cfg.model or ModelConfig.model_validate((state.current or {}).get("model") or {})
    if (
        state.current is not None
        and ModelConfig.model_validate(state.current.get("model") or {}) != state.model
    ):
        log.warning("the model differs from the current version's: every data set is ingested again")
        state.current, state.current_folder = None, None
    entries = read_registry(cfg.registry)
    state.registry, state.skipped = fetchable(entries)
    state.fingerprints = {n: fingerprint(s) for n, s in state.registry.items() if not s.removed}
    state.delta = plan_delta(state.registry, state.fingerprints, current_sources(state.current))
    keep_skipped(state)
    if not state.delta.keep and not state.delta.ingest:
        raise ConfigError(
            f"the registry {cfg.registry} has no active data set; nothing to index"
            + (f" ({len(state.skipped)} skipped: no source or withdrawn)" if state.skipped else "")
        )


def read_registry(uri: str) -> dict[str, catalog.Entry]:
    """The registry: one folder, or several separated by commas (catalogues first, the operator's
    registry last; a later entry of the same name wins). Each is a local folder, or gs:// (its YAMLs
    copied to a temporary folder first)."""
    return catalog.load_layers(uri, catalog.read_folder)


def fetchable(entries: dict[str, catalog.Entry]) -> tuple[dict[str, DatasetSpec], dict[str, str]]:
    """(the specs a rebuild may fetch, removed ones included; name -> why each other one is skipped).
    Never fetched: an entry without a source, a catalogue entry whose status is withdrawn
    (``catalog.skip_reason``); each skip is logged in one line saying why."""
    specs: dict[str, DatasetSpec] = {}
    skipped: dict[str, str] = {}
    for name, entry in entries.items():
        why = None if entry.spec.removed else catalog.skip_reason(entry)
        if why is None:
            specs[name] = entry.spec
        else:
            skipped[name] = why
            log.warning("%s", catalog.skip_message(entry))
    return specs, skipped


def keep_skipped(state: Rebuild) -> None:
    """A skipped data set the current version holds (an operator's copy, since taken out of their
    registry) is kept as it is, never fetched; the others are not indexed. Each reason goes to the
    plan (and the report)."""
    assert state.delta is not None
    before = current_sources(state.current)
    for name, why in state.skipped.items():
        if name in before and name in state.delta.removed:
            state.delta.removed.remove(name)
            state.delta.keep[name] = before[name]
            state.delta.reasons[name] = f"kept as it is, not fetched: {why}"
        else:
            state.delta.reasons[name] = f"skipped: {why}"


def ingest(state: Rebuild) -> None:
    """One run of the new and changed data sets (none when only removals changed)."""
    assert state.delta is not None
    state.sources = dict(state.delta.keep)
    if not state.delta.ingest:
        return
    job = ingest_job(state)
    run = storage.join(state.config.work, "runs", job.run_id or "")
    if job.engine == "beam" and beam_in_flight(run, state.config.beam_wait_s):
        state.status = f"ingest run {job.run_id} is still in flight; the next rebuild goes on from it"
        return
    summary = run_ingest(state, job)
    if not is_committed(summary.uri):  # a runner that returns before its job ends (a flex template)
        state.status = f"ingest run {job.run_id} submitted; the next rebuild goes on once it is committed"
        return
    state.run_uri, state.analyzed = summary.uri, summary.analyzed
    state.run_report = report.run_report(summary.uri, summary.analyzed)
    report.write_report(summary.uri, state.run_report)
    for spec in state.delta.ingest:
        state.sources[spec.name] = Source(
            spec.name, spec.version, state.fingerprints[spec.name], (summary.run_id,)
        )


def beam_in_flight(run: str, wait_s: float) -> bool:
    """A Beam run of this id was submitted and has not committed: its plan file is there, and
    younger than ``wait_s`` (older: the job died, and the run is submitted again, resuming)."""
    plan_file = storage.join(run, orphans.BEAM_PLAN)
    if is_committed(run) or not storage.exists(plan_file):
        return False
    fs, path = storage.url_to_fs(plan_file)
    written = report.commit_time(fs.info(path))
    return written is not None and time.time() - written < wait_s


def ingest_job(state: Rebuild) -> JobConfig:
    cfg, delta = state.config, state.delta
    assert delta is not None
    return JobConfig(
        datasets=delta.ingest,
        out=cfg.work,
        engine=cfg.engine,
        run_id=rebuild_run_id(state),
        model=state.model,
        decode=cfg.decode,
        http=cfg.http,
        images_per_shard=cfg.images_per_shard,
        workers=cfg.workers,
        progress=cfg.progress,
        ray=cfg.ray,
        beam=cfg.beam,
        erasure_log=erasure.default_log(cfg.index),  # erased faces are never written again
    )


def rebuild_run_id(state: Rebuild) -> str:
    """The same delta from the same version gets the same run id: a killed rebuild resumes its run."""
    assert state.delta is not None
    payload = {
        "base": (state.current or {}).get("version"),
        "ingest": sorted((s.name, state.fingerprints[s.name]) for s in state.delta.ingest),
        "model": state.model.model_dump(),
        "images_per_shard": state.config.images_per_shard,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{prune.REBUILD_RUN_PREFIX}{digest[:16]}"


def run_ingest(state: Rebuild, job: JobConfig):
    """Ingest the delta on the configured engine; images the current version already embedded
    with this model are not decoded or embedded again, on any engine."""
    known, runs = known_images(state)
    return run_job(job, (), known, runs)  # Beam's pipeline options: job.beam.options


def current_runs(state: Rebuild) -> list[runsmod.Run]:
    """The runs the current version was built from, each checked against the manifest digest it recorded."""
    runs = []
    current = state.current or {}
    for entry in current.get("runs", []):
        run = runsmod.load_run(entry["uri"])
        if run.manifest_sha256 != entry["manifest_sha256"]:
            raise FatalError(
                f"{entry['uri']}: its manifest changed since version {current.get('version')} "
                "was built from it"
            )
        runs.append(run)
    return runs


def known_images(state: Rebuild) -> tuple[dict[str, ImageResult], list[str]]:
    """image_sha256 -> result of every live image the current version holds (faces: only those it
    indexed), so that the ingest embeds only bytes it has never embedded with this model."""
    if state.current is None or state.current_folder is None:
        return {}, []
    from indexing.extend import restrict

    indexed = indexed_images(state.current, state.current_folder)
    live = live_pairs(current_sources(state.current))
    runs = current_runs(state)
    known: dict[str, ImageResult] = {}
    for run in runs:
        scope = [restrict(run, live.get(run.run_id, set()))]
        for batch in runsmod.image_batches(scope, list(RESULT_COLUMNS)):
            for row in batch.to_pylist():
                sha = row["image_sha256"]
                if sha and row["status"] in KNOWN_STATUSES and (row["n_faces"] == 0 or sha in indexed):
                    known.setdefault(sha, result_from_image_row(row))
    return known, [r.run_id for r in runs]


def indexed_images(manifest: dict, folder: str) -> set[str]:
    """The image_sha256 of every face a version indexed (from its metadata files)."""
    shas: set[str] = set()
    for shard in manifest["shards"]:
        table = report.read_columns(folder, shard["metadata"]["file"], ["image_sha256"])
        shas.update(table.column(0).to_pylist())
    return shas


def build(state: Rebuild) -> None:
    """The next version, manifest committed, CURRENT untouched."""
    cfg, s = state.config, state.config.index_settings
    runs = current_runs(state)
    if state.run_uri is not None and all(r.uri != state.run_uri for r in runs):
        runs.append(runsmod.load_run(state.run_uri))
    runs.sort(key=lambda r: (r.run_id, r.uri))
    # every index setting but these two is a BuildOptions field of the same name
    build_opts = BuildOptions(**s.model_dump(exclude={"min_recall", "growth_factor"}))
    opts = VersionOptions(build_opts, growth_factor=s.growth_factor)
    runner = shard_runner(cfg.engine, cfg.ray.address, cfg.beam.options if cfg.engine == "beam" else ())
    result = build_version(
        runs, live_pairs(state.sources), cfg.index, opts, state.current, state.current_folder, runner
    )
    for entry in result.manifest["datasets"]:
        entry["fingerprint"] = state.sources[entry["name"]].fingerprint
    result.manifest["rebuild"]["sources"] = record_sources(state.sources)
    assert state.delta is not None
    result.manifest["rebuild"]["delta"] = state.delta.summary()
    checkpoint("rebuild.before_manifest")
    write_manifest(cfg.index, result.version, result.manifest)
    state.version = result


def check(state: Rebuild) -> None:
    """Open the new version as a consumer would (every sha256), then its counts, data sets and recall."""
    assert state.version is not None
    folder, body = state.version.folder, state.version.manifest
    try:
        problems = version_problems(folder, body, state.sources, state.config)
    except IntegrityError as exc:
        problems = [str(exc)]
    if problems:
        discard(folder)
        raise FatalError(
            f"version {state.version.version} failed its checks, CURRENT not moved: " + "; ".join(problems)
        )


def version_problems(folder: str, body: dict, sources: dict[str, Source], cfg: RebuildConfig) -> list[str]:
    problems = []
    index = open_index(folder, cache_dir=None)
    try:
        if index.ntotal != body["counts"]["faces"]:
            problems.append(f"{index.ntotal} vectors, the manifest counts {body['counts']['faces']} faces")
        rows = sum(int(s["metadata"]["rows"]) for s in body["shards"])
        if rows != index.ntotal:
            problems.append(f"{rows} metadata rows for {index.ntotal} vectors")
    finally:
        index.close()
    names = {d["name"] for d in body["datasets"]}
    if names != set(sources):
        problems.append(f"data sets {sorted(names)}, the registry has {sorted(sources)}")
    floor = cfg.index_settings.min_recall
    floor = cfg.index_settings.target_recall if floor is None else floor
    if body["recall"]["at_10"] < floor:
        problems.append(f"recall@10 {body['recall']['at_10']:.3f} is below {floor}")
    return problems


def publish(state: Rebuild) -> None:
    assert state.version is not None
    index = state.config.index
    if erase.catch_up(index, state.version.erasures, erasure.default_log(index), state.version.manifest):
        state.version.manifest = read_bundle_manifest(state.version.folder)  # swept in place
    checkpoint("rebuild.before_current")
    if not bundle.move_current(state.config.index, state.version.version):
        raise FatalError(f"CURRENT already names a newer version than {state.version.version}; not moved")
    state.status = "published"


def collect_garbage(state: Rebuild) -> None:
    cfg = state.config
    current = (
        storage.read_text(storage.join(cfg.index, bundle.CURRENT)).strip()
        if storage.exists(storage.join(cfg.index, bundle.CURRENT))
        else None
    )
    protect = {state.run_uri.rsplit("/", 1)[-1]} if state.run_uri else set()
    state.gc = prune.collect(
        cfg.index, cfg.work, cfg.keep_versions, cfg.gc_grace_s, current, protect_runs=protect
    )


def write_rebuild_report(state: Rebuild) -> None:
    body = rebuild_report(state)
    stamp = state.started.strftime("%Y%m%dT%H%M%SZ")
    suffix = state.version.version if state.version else "no-change"
    if state.status.startswith("failed"):
        suffix = "failed"
    name = f"{stamp}-{suffix}"
    state.report_uri = report.write_report(storage.join(state.config.index, "reports", name), body)[1]


def rebuild_report(state: Rebuild) -> dict:
    v = state.version
    return {
        "kind": "rebuild",
        "status": state.status,
        "index": report.index_figures(v.manifest) if v else None,
        "index_root": state.config.index,
        "registry": state.config.registry,
        "started_at": state.started.isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "base_version": (state.current or {}).get("version"),
        "version": v.version if v else None,
        "delta": state.delta.summary() if state.delta else None,
        "decoded_and_embedded": state.analyzed,
        "ingest": state.run_report,
        "gc": state.gc.summary() if state.gc else None,
        "steps_seconds": state.steps,
    }
