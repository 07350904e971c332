"""Sweeping runs: each faces shard rewritten without the erased faces, then the run manifest."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import erasure, storage
from pipelines.core.errors import FatalError
from pipelines.core.faults import checkpoint
from pipelines.core.writer import RUN_MANIFEST, parquet_bytes

from .report import Report

PENDING = "_erasure_pending.json"  # in a run folder: sha256s of shards an interrupted erase rewrote


def sweep_run(run: str, erased: erasure.ErasureSet, report: Report) -> str:
    """Rewrite the run's faces shards without erased faces, then its manifest; its new sha256."""
    manifest_uri = storage.join(run, RUN_MANIFEST)
    raw = storage.read_bytes(manifest_uri)
    manifest = json.loads(raw)
    pending_uri = storage.join(run, PENDING)
    pending = json.loads(storage.read_bytes(pending_uri)) if storage.exists(pending_uri) else {}
    removed, changed = 0, False
    for entry in manifest["shards"]:
        if entry["table"] != "faces":
            continue
        uri = storage.join(run, entry["file"])
        data = storage.read_bytes(uri)
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry["sha256"] and pending.get(entry["file"]) != actual:
            raise FatalError(f"{uri}: sha256 does not match its run manifest; erase leaves the run untouched")
        table = pq.read_table(pa.BufferReader(data))
        gone = erased.mask(
            table.column("face_id").to_numpy(),
            table.column("image_sha256").to_pylist() if erased.whole_images else None,
        )
        if gone.any():
            kept = table.filter(pa.array(~gone))
            new = parquet_bytes(kept)
            pending[entry["file"]] = hashlib.sha256(new).hexdigest()
            storage.write_atomic(pending_uri, json.dumps(pending, sort_keys=True).encode())
            checkpoint("erase.run_pending")
            storage.write_atomic(uri, new)
            report.noncurrent_deleted += storage.purge_history(uri)
            checkpoint("erase.run_shard")
            entry.update(sha256=pending[entry["file"]], rows=kept.num_rows)
            removed += int(gone.sum())
            report.run_shards_rewritten += 1
            changed = True
        elif actual != entry["sha256"]:  # rewritten by an interrupted erase before its manifest
            entry.update(sha256=actual, rows=table.num_rows)
            changed = True
    if not changed:
        return hashlib.sha256(raw).hexdigest()
    counts = manifest.setdefault("counts", {})
    before = int(counts.get("faces", 0))
    counts["faces"] = sum(int(e["rows"]) for e in manifest["shards"] if e["table"] == "faces")
    counts["faces_erased"] = int(counts.get("faces_erased", 0)) + before - counts["faces"]
    manifest["erased_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()  # as writer.write_manifest writes it
    storage.write_atomic(manifest_uri, data)
    checkpoint("erase.run_manifest")
    report.noncurrent_deleted += storage.purge_history(manifest_uri)
    storage.remove(pending_uri)
    report.noncurrent_deleted += storage.purge_history(pending_uri)
    report.run_faces_removed += removed
    report.runs_updated.append(run)
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- index bundles
