"""Erasure on request: find a person's faces, log them (hashes only), then remove them everywhere.

Order, which makes an erasure crash-safe and idempotent (docs/erasure.md):

1. ``ErasureLog.append``: one create-only entry of salted hashes. From here on no search, index
   build, ingest or export returns or writes those faces, whatever is still on disk.
2. ``sweep``: everything the log names is removed physically, each file rewritten whole and
   committed, manifests last: the faces shards of every run the index's versions were built from
   (then the run manifest), every index version (new file names, then the manifest), exports the
   operator names, and download caches. Old objects and, on GCS, their noncurrent versions are
   deleted. A sweep removes whatever the log names and is still there, so running it again after
   a crash finishes the job, and running it when nothing is left changes nothing.

Concurrency: sweeps of one index root run one at a time, under a lock object beside the rebuild's
(``_erase.lock``); a second eraser waits for it and then sweeps itself, since the running sweep may
have read the log before the second entry. An index build or rebuild re-reads the log after its
manifest is committed and before it moves CURRENT (``catch_up``) and sweeps when an entry came in
after it read the log: an eraser lists the versions after logging and a build reads the log after
its manifest, so one of the two always sees the other and a new version cannot bring a face back.
"""

from .bundles import index_root, read_bundle_manifest, version_folders, without_erased
from .find import Found, find_by_ids, find_by_photos
from .report import Report
from .runs import PENDING, sweep_run
from .steps import catch_up, erase, log_faces, sweep

__all__ = [
    "PENDING",
    "Found",
    "Report",
    "catch_up",
    "erase",
    "find_by_ids",
    "find_by_photos",
    "index_root",
    "log_faces",
    "read_bundle_manifest",
    "sweep",
    "sweep_run",
    "version_folders",
    "without_erased",
]
