"""``faceaudit serve``: the look-up service for the people in the data sets (DESIGN.md).

FastAPI on uvicorn. At start-up one background thread opens the index (verified; a gs:// bundle
is downloaded and checked first), its range tables, ``workers`` models and the isolated decode
pool; ``/readyz`` answers 200 only once that is done, ``/healthz`` at once.

Nothing a person sends is kept: a photo is read from the socket into memory under a hard cap
(never spooled to a temporary file: the multipart body is parsed here, in memory, not by
python-multipart), decoded in an isolated worker process, and dropped with the pixels and the
query embeddings when the answer is sent. Result lists are not logged, and no log line, metric or
file holds a client address: rate limits key on an HMAC of it under a key that rotates daily
(``limits.py``), and uvicorn's access log is off.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from indexing import bundle
from indexing.errors import QueryError
from indexing.lookup import RangeTables
from indexing.photo_lookup import PhotoLookup, PhotoResult
from indexing.requests import RecordSigner, RequestStore, TokenError
from indexing.search import Index, open_index
from pipelines.core import storage
from pipelines.core.errors import FaceauditError

from . import page
from .config import ServeConfig
from .limits import Capacity, ClientKeys, Limited, RateLimiter

log = logging.getLogger("faceaudit.serve")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(self), microphone=(), geolocation=()",
}
FORM_OVERHEAD = 64 << 10  # multipart headers and the consent field, beyond the photo itself
MAX_PARTS = 8
MAX_JSON = 64 << 10


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ---------------------------------------------------------------- the loaded index


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


# ---------------------------------------------------------------- request bodies, in memory only


async def read_body(request: Request, cap: int) -> bytes:
    """The raw body, refused (413) past ``cap`` bytes, whether Content-Length says so or not."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HttpError(400, "bad Content-Length")
        if int(declared) > cap:
            raise HttpError(413, f"the upload is larger than {cap} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise HttpError(413, f"the upload is larger than {cap} bytes")
    return bytes(body)


def parse_multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """multipart/form-data parsed in memory: field name -> bytes (the first of each name)."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise HttpError(400, "send the photo as multipart/form-data")
    boundary = None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary or len(boundary) > 200:
        raise HttpError(400, "multipart body without a boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    pieces = (b"\r\n" + body).split(delimiter)
    if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
        raise HttpError(400, "malformed multipart body")
    fields: dict[str, bytes] = {}
    for piece in pieces[1:-1][:MAX_PARTS]:
        head, sep, content = piece.partition(b"\r\n\r\n")
        if not sep or len(head) > 4096:
            raise HttpError(400, "malformed multipart body")
        name = None
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                for param in value.split(";"):
                    k, _, v = param.strip().partition("=")
                    if k.lower() == "name":
                        name = v.strip().strip('"')
        if name is not None and name not in fields:
            fields[name] = content
    return fields


def client_address(request: Request, config: ServeConfig) -> str:
    if config.trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for", "")
        if forwarded.strip():
            return forwarded.split(",")[0].strip()
    return request.client.host if request.client else ""


def bearer_ok(request: Request, config: ServeConfig) -> bool:
    token = config.bearer()
    given = request.headers.get("authorization", "")
    return (
        bool(token)
        and given.startswith("Bearer ")
        and hmac.compare_digest(given[7:].encode(), token.encode())
    )


# ---------------------------------------------------------------- the app


def create_app(config: ServeConfig, service: Service | None = None) -> FastAPI:
    svc = service or Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=svc.load, name="load-index", daemon=True)
        loader.start()
        reloader = None
        if config.reload_on_current:
            reloader = threading.Thread(target=svc.reload_loop, name="reload-on-current", daemon=True)
            reloader.start()
        try:
            yield
        finally:
            svc.stop.set()
            await asyncio.get_running_loop().run_in_executor(None, loader.join)
            svc.close()

    app = FastAPI(
        title="faceaudit look-up service", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.service = svc

    def version() -> str | None:
        return svc.loaded.version if svc.loaded is not None else None

    def error_json(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "index_version": version()}, status, headers=headers)

    @app.middleware("http")
    async def headers_and_errors(request: Request, call_next):
        route = request.scope.get("path", "")
        try:
            response = await call_next(request)
        except Exception:  # never a traceback with request data in it; the route is enough
            log.error("internal error on %s", route.split("/")[1:3])
            response = error_json(500, "internal error")
        response.headers.update(SECURITY_HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")
        template = request.scope.get("route")
        svc.metrics.requests.labels(getattr(template, "path", "other"), str(response.status_code)).inc()
        return response

    @app.exception_handler(HttpError)
    async def http_error(request: Request, exc: HttpError):
        if exc.status in (429, 503):
            svc.metrics.limited.labels(str(exc.status)).inc()
        if wants_html(request):
            return HTMLResponse(page.error_page(exc.message, exc.status), exc.status, headers=exc.headers)
        return error_json(exc.status, exc.message, exc.headers)

    @app.exception_handler(Limited)
    async def limited(request: Request, exc: Limited):
        return await http_error(
            request, HttpError(exc.status, exc.message, {"Retry-After": str(exc.retry_after)})
        )

    @app.exception_handler(QueryError)
    async def query_error(request: Request, exc: QueryError):
        return await http_error(request, HttpError(400, str(exc)))

    # health

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "index_version": version()}

    @app.get("/readyz")
    async def readyz():
        if not svc.ready.is_set():
            return error_json(503, svc.failed or "loading", {"Retry-After": "5"})
        return {"status": "ready", "index_version": version()}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/coverage")
    async def coverage():
        loaded = svc.current()
        keys = ("name", "version", "license", "description", "images", "faces", "contact")
        return {
            "index_version": loaded.version,
            "created_at": loaded.created_at,
            "datasets": [{k: d[k] for k in keys} for d in loaded.datasets],
            # known data sets this index does not hold: "no match" is never "in no data set"
            "not_covered": not_covered(svc.registry, {d["name"] for d in loaded.datasets}),
        }

    # photo search

    async def photo_search(request: Request) -> tuple[int, dict, bool]:
        svc.limits["search"].take(client_address(request, config))
        body = await read_body(request, config.max_upload_bytes + FORM_OVERHEAD)
        fields = parse_multipart(request.headers.get("content-type", ""), body)
        del body
        if fields.get("consent", b"").strip() != b"yes":
            raise HttpError(
                400, "a search needs your consent (consent=yes): the photo is used once and not kept"
            )
        photo = fields.pop("photo", None)
        if not photo:
            raise HttpError(400, "no photo was sent (multipart field 'photo')")
        if len(photo) > config.max_upload_bytes:
            raise HttpError(413, f"the photo is larger than {config.max_upload_bytes} bytes")
        results = fields.get("results", b"datasets").decode("ascii", "replace").strip() or "datasets"
        if results not in ("datasets", "sources"):
            raise HttpError(400, "results is 'datasets' or 'sources'")
        sources = results == "sources"
        if sources and not bearer_ok(request, config):
            raise HttpError(403, "results=sources needs the operator's bearer token")
        svc.current()
        status, data = await svc.search(photo, sources)
        del photo
        return status, data, sources

    @app.post("/v1/search")
    async def search_json(request: Request):
        status, data, _ = await photo_search(request)
        return JSONResponse(data, status)

    @app.post("/search")
    async def search_form(request: Request):
        request.scope["faceaudit.html"] = True
        status, data, _ = await photo_search(request)
        loaded = svc.current()
        return HTMLResponse(page.result_page(data, loaded.datasets), status)

    # identifier look-up

    @app.get("/v1/source/range/{prefix}")
    async def source_range(prefix: str, request: Request):
        svc.limits["range"].take(client_address(request, config))
        loaded = svc.current()
        if not loaded.ranges.available:
            raise HttpError(
                503,
                "this index version has no range tables (rebuild it to get them)",
                {"Retry-After": "3600"},
            )
        loaded.index.recheck_erasures()
        found = loaded.ranges.range(prefix, loaded.index.erased)
        return {
            "index_version": loaded.version,
            "prefix": prefix.lower(),
            "matches": [{"suffix": m.suffix, "datasets": m.datasets} for m in found],
        }

    # erasure requests

    def new_request(records: object, contact: object) -> dict:
        loaded = svc.current()
        if not isinstance(records, list) or not records or len(records) > 100:
            raise HttpError(400, "records: a list of 1 to 100 record tokens from a search")
        if contact is not None and not isinstance(contact, str):
            raise HttpError(400, "contact must be text")
        face_ids = []
        for token in records:
            try:
                face_ids.append(svc.signer.verify(token).face_id)
            except TokenError as exc:
                raise HttpError(400, str(exc)) from exc
        request = svc.store.create(face_ids, loaded.version, contact)
        svc.metrics.erasure_requests.inc()
        return {**request.public(), "index_version": loaded.version}

    @app.post("/v1/erasure-requests")
    async def erasure_request(request: Request):
        svc.limits["request"].take(client_address(request, config))
        body = await read_body(request, MAX_JSON)
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise HttpError(400, 'send JSON: {"records": [token, ...], "contact": "..."}') from exc
        if not isinstance(data, dict):
            raise HttpError(400, "send a JSON object")
        created = await asyncio.get_running_loop().run_in_executor(
            None, new_request, data.get("records"), data.get("contact")
        )
        return JSONResponse(created, 201)

    @app.post("/erasure-requests")
    async def erasure_request_form(request: Request):
        request.scope["faceaudit.html"] = True
        svc.limits["request"].take(client_address(request, config))
        form = parse_qs((await read_body(request, MAX_JSON)).decode("utf-8", "replace"))
        contact = (form.get("contact") or [""])[0] or None
        created = await asyncio.get_running_loop().run_in_executor(
            None, new_request, form.get("record", []), contact
        )
        return HTMLResponse(page.receipt_page(created, svc.current().datasets), 201)

    @app.get("/v1/erasure-requests/{request_id}")
    async def erasure_status(request_id: str):
        loaded = svc.current()
        found = await asyncio.get_running_loop().run_in_executor(None, svc.store.get, request_id)
        if found is None:
            raise HttpError(404, "no such erasure request")
        return {**found.public(), "index_version": loaded.version}

    # the page

    @app.get("/", response_class=HTMLResponse)
    async def index_page():
        loaded = svc.loaded if svc.ready.is_set() else None
        return HTMLResponse(
            page.main_page(loaded.datasets if loaded else [], loaded.version if loaded else None, config)
        )

    @app.get("/static/{name}")
    async def static(name: str):
        found = page.static_file(name)
        if found is None:
            raise HttpError(404, "not found")
        body, media = found
        return Response(body, media_type=media, headers={"Cache-Control": "public, max-age=300"})

    return app


def wants_html(request: Request) -> bool:
    return bool(request.scope.get("faceaudit.html"))


def serve(config: ServeConfig) -> None:  # pragma: no cover - exercised by the bench and the CLI test
    import uvicorn

    app = create_app(config)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        access_log=False,
        server_header=False,
        limit_concurrency=config.workers + config.queue + 64,
        log_config=None,
    )


__all__ = ["HttpError", "Service", "create_app", "serve"]
