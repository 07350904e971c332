"""Where each export of an index went (``<index>/_exports/``), so that every erasure of the index
reaches its exports too, whether or not the eraser names them."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

from pipelines.core import storage

EXPORTS = "_exports"


def record_export(root: str, to: str) -> str:
    """``<root>/_exports/<id>.json``: every erasure of ``root`` sweeps ``to`` too (one record per
    destination, create-only; a later export to the same place finds it there)."""
    record = storage.join(root, EXPORTS, hashlib.sha256(to.encode()).hexdigest()[:32] + ".json")
    body = {"to": to, "recorded_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        storage.write_atomic(record, json.dumps(body, sort_keys=True).encode(), create_only=True)
    except storage.AlreadyExists:
        pass
    return record


def recorded_exports(root: str) -> list[str]:
    """The destinations of every export made from the index ``root``."""
    folder = storage.join(root, EXPORTS)
    if not storage.exists(folder):
        return []
    names = sorted(n for n in storage.listdir(folder) if n.endswith(".json"))
    return [json.loads(storage.read_bytes(storage.join(folder, n)))["to"] for n in names]
