"""Erase = log, then sweep: the order that makes an erasure crash-safe and idempotent."""

from __future__ import annotations

from collections.abc import Iterable

from pipelines.core import erasure, storage
from pipelines.core.faults import checkpoint
from pipelines.core.locks import sweep_lock
from pipelines.core.writer import RUN_MANIFEST

from ..export_records import recorded_exports
from .bundles import (
    default_cache,
    index_root,
    purge_cache,
    read_bundle_manifest,
    sweep_bundle,
    version_folders,
)
from .find import Found
from .report import Report
from .runs import sweep_run


def erase(
    index_uri: str,
    found: list[Found],
    extra_face_ids: Iterable[int] = (),
    whole_images: Iterable[str] = (),
    log_uri: str | None = None,
    exports: Iterable[str] = (),
    cache_dirs: Iterable[str] = (),
) -> Report:
    """Log the faces (the intent: from now on nothing returns them), then remove them everywhere."""
    log = erasure.ErasureLog(log_uri or erasure.default_log(index_root(index_uri)))
    entry = log_faces(log, found, extra_face_ids, whole_images)
    checkpoint("erase.logged")
    with sweep_lock(index_root(index_uri)):
        report = sweep(index_uri, log, exports, cache_dirs)
    report.entry = entry
    return report


def log_faces(
    log: erasure.ErasureLog,
    found: list[Found],
    extra_face_ids: Iterable[int] = (),
    whole_images: Iterable[str] = (),
) -> str | None:
    """Append one entry for the faces (and whole images); returns its name, None when empty."""
    face_ids = sorted({f.face_id for f in found} | {int(i) for i in extra_face_ids})
    whole = sorted(set(whole_images))
    if not (face_ids or whole):
        return None
    return log.append(face_ids, sorted({f.image_sha256 for f in found} | set(whole)), whole)


def catch_up(root: str, honoured: Iterable[str], log_uri: str, manifest: dict) -> bool:
    """For a build holding the sweep lock, its manifest committed and CURRENT not yet moved: sweep
    the index root (the new version included) when the erasure log has entries the build did not
    read, or its runs hold faces the log names (``counts.erased``: an ingest that read the log
    before an erasure, a run restored from a backup). True if it swept."""
    log = erasure.ErasureLog(log_uri)
    if set(log.entry_names()) <= set(honoured) and not manifest.get("counts", {}).get("erased"):
        return False
    sweep(root, log)
    return True


def sweep(
    index_uri: str, log: erasure.ErasureLog, exports: Iterable[str] = (), cache_dirs: Iterable[str] = ()
) -> Report:
    """Remove every face the log names from the runs, every index version, the exports and caches."""
    report = Report()
    erased = log.load()
    if not erased:
        return report
    versions = version_folders(index_uri)
    run_uris: list[str] = []
    for folder in versions:
        manifest = read_bundle_manifest(folder)
        run_uris.extend(r["uri"] for r in manifest.get("runs", []) if r["uri"] not in run_uris)
    run_shas = {}
    for run in run_uris:
        if storage.exists(storage.join(run, RUN_MANIFEST)):
            run_shas[run] = sweep_run(run, erased, report)
    everywhere = dict.fromkeys([*exports, *recorded_exports(index_root(index_uri))])
    for folder in [*versions, *(v for e in everywhere if storage.exists(e) for v in version_folders(e))]:
        sweep_bundle(folder, erased, run_shas, report)
    for cache in [*cache_dirs, default_cache()]:
        report.caches_removed.extend(purge_cache(cache, erased, versions))
    return report
