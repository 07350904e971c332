"""The service's state: the loaded index (reloaded when CURRENT moves), its metrics, and the photo
search's answer in DESIGN.md's shape."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from indexing import bundle
from indexing.lookup import RangeTables
from indexing.photo_lookup import PhotoLookup, PhotoResult
from indexing.requests import RecordSigner, RequestStore
from indexing.search import Index, open_index
from pipelines.core import storage
from pipelines.core.errors import FaceauditError

from .bodies import HttpError
from .config import ServeConfig
from .limits import Capacity, ClientKeys, RateLimiter

log = logging.getLogger("faceaudit.serve")


@dataclass(slots=True)
class Loaded:
    """One opened version: swapped whole when CURRENT moves (``--reload-on-current``)."""

    index: Index
    version: str
    ranges: RangeTables
    datasets: list[dict]
    created_at: str | None

    @property
    def names(self) -> list[str]:
        return [d["name"] for d in self.datasets]


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "faceaudit_requests", "HTTP requests by route and status", ["route", "code"], registry=r
        )
        self.searches = Counter(
            "faceaudit_photo_searches", "photo searches by outcome", ["outcome"], registry=r
        )
        self.limited = Counter("faceaudit_limited", "requests refused by a limit", ["limit"], registry=r)
        self.seconds = Histogram("faceaudit_search_seconds", "photo search time (s)", registry=r)
        self.in_flight = Gauge("faceaudit_searches_in_flight", "photo searches admitted", registry=r)
        self.erasure_requests = Counter("faceaudit_erasure_requests", "erasure requests received", registry=r)


class Service:
    """Everything the routes share; ``load()`` fills it once (and ``reload()`` on a new CURRENT)."""

    def __init__(self, config: ServeConfig, photo_lookup=None):
        self.config = config
        self.loaded: Loaded | None = None
        self.photo = photo_lookup
        self.ready = threading.Event()
        self.failed: str | None = None
        secret = config.record_secret()
        self.signer = (
            RecordSigner(secret, config.record_ttl_s) if secret else RecordSigner.random(config.record_ttl_s)
        )
        self.store = RequestStore(index_root(config.index))
        self.capacity = Capacity(config.workers + config.queue, config.retry_after_s)
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="search")
        keys = ClientKeys()
        self.limits = {
            "search": RateLimiter("photo searches", config.search_per_hour, 3600, keys),
            "range": RateLimiter("range look-ups", config.range_per_minute, 60, keys),
            "request": RateLimiter("erasure requests", config.requests_per_hour, 3600, keys),
        }
        self.registry = read_registry(config.registry)
        self.metrics = Metrics()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    # loading

    def load(self) -> None:
        try:
            self.loaded = self.open()
            if self.photo is None:
                self.photo = PhotoLookup(self.loaded.index, self.config.workers)
            self.ready.set()
            log.info("ready: index version %s, %d faces", self.loaded.version, self.loaded.index.ntotal)
        except (FaceauditError, OSError, ValueError) as exc:
            self.failed = str(exc)
            log.error("the index could not be loaded: %s", exc)

    def open(self) -> Loaded:
        c = self.config
        idx = open_index(c.index, cache_dir=c.cache_dir, public_key=c.public_key)
        manifest = idx.manifest
        ranges = RangeTables.open(idx.folder, manifest)
        if not ranges.available:
            log.warning(
                "index version %s has no range tables; /v1/source/range answers 503", manifest["version"]
            )
        datasets = []
        for d in manifest.get("datasets", []):
            spec = self.registry.get(d["name"])
            datasets.append(
                {
                    "name": d["name"],
                    "version": str(d.get("version", "")),
                    "license": (spec.license if spec else None) or d.get("license") or "unknown",
                    "description": (spec.description if spec else None) or "",
                    "contact": (spec.contact if spec else None),
                    "images": int(d.get("images", 0)),
                    "faces": int(d.get("faces", 0)),
                }
            )
        return Loaded(idx, str(manifest["version"]), ranges, datasets, manifest.get("created_at"))

    def reload_loop(self) -> None:
        """``--reload-on-current``: open the version CURRENT names when it changes; the old one
        keeps answering until the new one is verified and loaded, then is closed a minute later."""
        while not self.stop.wait(self.config.reload_interval_s):
            self.reload_once()

    def reload_once(self) -> bool:
        if self.loaded is None:
            return False
        try:
            _, version = bundle.resolve(self.config.index)
            if version == self.loaded.version:
                return False
            fresh = self.open()
            if fresh.index.model_id != self.loaded.index.model_id:
                fresh.index.close()
                log.error("CURRENT names a version of another model; keeping %s", self.loaded.version)
                return False
        except (FaceauditError, OSError, ValueError) as exc:
            log.error("CURRENT moved but the new version could not be loaded (%s); keeping the old one", exc)
            return False
        old, self.loaded = self.loaded, fresh
        timer = threading.Timer(60.0, old.index.close)
        timer.daemon = True
        timer.start()
        log.info("reloaded: index version %s", fresh.version)
        return True

    def current(self) -> Loaded:
        if self.loaded is None or not self.ready.is_set():
            raise HttpError(503, "the index is still loading", {"Retry-After": "5"})
        return self.loaded

    def close(self) -> None:
        self.stop.set()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.photo is not None:
            self.photo.close()
        if self.loaded is not None:
            self.loaded.index.close()

    # photo search

    def possible_threshold(self, idx: Index) -> float:
        c = self.config
        return (
            c.possible_threshold
            if c.possible_threshold is not None
            else max(idx.match_threshold - c.possible_margin, 0.01)
        )

    async def search(self, data: bytes, sources: bool) -> tuple[int, dict]:
        """Admitted only while a slot is free (``workers`` running + ``queue`` waiting), else 503
        at once; the work runs on the service's own bounded pool, never the event loop's."""
        loaded = self.current()
        possible = self.possible_threshold(loaded.index)
        with self.capacity:
            self.metrics.in_flight.inc()
            started = time.perf_counter()
            try:
                future = self.executor.submit(self.photo.lookup, loaded.index, data, self.config.k, possible)
                result = await asyncio.wrap_future(future)
            finally:
                self.metrics.in_flight.dec()
                self.metrics.seconds.observe(time.perf_counter() - started)
        self.metrics.searches.labels(result.status).inc()
        return answer(loaded, result, self.signer, sources, possible)


def answer(
    loaded: Loaded, result: PhotoResult, signer: RecordSigner, sources: bool, possible: float
) -> tuple[int, dict]:
    """The JSON of a photo search (DESIGN.md's shape): per face, per (indexed face, data set) a
    match with its band and record token; never an embedding, a thumbnail or another photo's URL
    unless ``sources``."""
    info = {d["name"]: d for d in loaded.datasets}
    base = {
        "index_version": loaded.version,
        "datasets_searched": [{k: d[k] for k in ("name", "version", "license")} for d in loaded.datasets],
        "bands": {"strong": loaded.index.match_threshold, "possible": possible},
    }
    if result.status == "error":
        return 422, {**base, "status": "error", "error": f"the photo could not be read: {result.error}"}
    faces = []
    for face in result.faces:
        matches, per_dataset = [], {}
        for banded in face.matches:
            hit = banded.hit
            by_ds: dict[str, list[str]] = {}
            for occ in hit.occurrences:
                by_ds.setdefault(occ.dataset, []).append(occ.source_uri)
            record = signer.sign(hit.face_id, loaded.version)
            for name, uris in sorted(by_ds.items()):
                d = info.get(name, {"version": "", "license": "unknown"})
                match = {
                    "band": banded.band,
                    "score": round(hit.score, 3),
                    "dataset": name,
                    "version": d["version"],
                    "license": d["license"],
                    "bbox": [round(v, 1) for v in hit.bbox],
                    "images": len(uris),
                    "record": record,
                }
                if sources:
                    match["source_uri"] = uris[0]
                    match["source_uris"] = uris
                matches.append(match)
                seen = per_dataset.setdefault((name, banded.band), set())
                seen.add(hit.image_sha256)
        summary = [
            {
                "name": n,
                "version": info.get(n, {}).get("version", ""),
                "license": info.get(n, {}).get("license", "unknown"),
                "band": b,
                "images": len(s),
            }
            for (n, b), s in sorted(per_dataset.items(), key=lambda kv: (kv[0][1] != "strong", kv[0][0]))
        ]
        faces.append({"bbox": face.bbox, "matches": matches, "datasets": summary})
    return 200, {**base, "status": result.status, "faces": faces}


def index_root(uri: str) -> str:
    if not uri:
        return "."
    if storage.exists(storage.join(uri.rstrip("/"), bundle.MANIFEST)):
        return bundle.root_of(uri.rstrip("/"))
    return uri.rstrip("/")


def not_covered(registry: dict, held: set[str]) -> list[dict]:
    """The registries' data sets (the catalogue of known ones, the operator's) this index lacks."""
    return [
        {"name": name, "status": spec.status, "license": spec.license, "contact": spec.contact}
        for name, spec in sorted(registry.items())
        if name not in held
    ]


def read_registry(folders: list[str]) -> dict:
    from pipelines.core import catalog

    present = [f for f in folders if Path(f).is_dir()]
    if not present:
        return {}
    try:
        return {name: e.spec for name, e in catalog.load_layers(present).items()}
    except FaceauditError as exc:
        log.warning("registry not read (%s); licences and contacts come from the manifest only", exc)
        return {}
