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
import json
import logging
import threading
from contextlib import asynccontextmanager
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)

from indexing.errors import QueryError
from indexing.requests import TokenError

from . import page
from .bodies import HttpError, bearer_ok, client_address, parse_multipart, read_body
from .config import ServeConfig
from .limits import Limited
from .state import Service, not_covered

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
MAX_JSON = 64 << 10


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
