"""Request bodies, held in memory only: an upload is read under a hard cap and parsed here, never
spooled to a temporary file; the client's address is read only to key the rate limits."""

from __future__ import annotations

import hmac

from fastapi import Request

from .config import ServeConfig

MAX_PARTS = 8


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


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
