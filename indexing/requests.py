"""Erasure requests from the look-up service: record tokens and the request store.

A search answers each match with a ``record``: a signed, expiring token naming the face_id (and
the index version it was found in), so that a person can ask for that face's erasure without the
service keeping anything between the search and the request. Tokens are HMAC-SHA256 under the
server's key (``RecordSigner``); a token the key did not sign, or one past its expiry, is refused.

A request is stored under ``<index>/_requests/<request_id>/``: ``request.json`` (create-only: the
face_ids, the index version, an optional contact, when) and, once an operator decides,
``decision.json`` (create-only: ``erased`` or ``rejected``, when, and how many faces). No photo and
no embedding is ever stored; ``faceaudit requests approve ID`` runs the existing erasure by
face_id (``indexing.erase``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field

from pipelines.core import storage
from pipelines.core.errors import ConfigError

from .errors import QueryError

REQUESTS = "_requests"
REQUEST_ID = re.compile(r"[0-9a-f]{32}")
STATUSES = ("received", "erased", "rejected")
MAX_RECORDS = 100  # tokens in one request
MAX_CONTACT = 320


class TokenError(QueryError):
    """A record token that is malformed, forged or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Record:
    face_id: int
    version: str
    expires: int


class RecordSigner:
    """HMAC-SHA256 record tokens: ``<payload>.<mac>``, both base64url, the payload JSON
    ``{"f": face_id, "v": version, "e": expiry (unix s)}``."""

    def __init__(self, key: bytes, ttl_s: int = 7 * 86400):
        if len(key) < 16:
            raise ConfigError("the record key must be at least 16 bytes")
        self.key = key
        self.ttl_s = int(ttl_s)

    @classmethod
    def random(cls, ttl_s: int = 7 * 86400) -> RecordSigner:
        return cls(secrets.token_bytes(32), ttl_s)

    def sign(self, face_id: int, version: str, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.ttl_s)
        payload = json.dumps({"f": int(face_id), "v": version, "e": expires}, separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(self, token: object, now: float | None = None) -> Record:
        if not isinstance(token, str) or len(token) > 512 or token.count(".") != 1:
            raise TokenError("not a record token")
        head, mac = token.split(".")
        try:
            payload, given = _unb64(head), _unb64(mac)
        except (ValueError, TypeError) as exc:
            raise TokenError("not a record token") from exc
        if not hmac.compare_digest(given, self._mac(payload)):
            raise TokenError("a record token this service did not sign")
        try:
            body = json.loads(payload)
            record = Record(int(body["f"]), str(body["v"]), int(body["e"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenError("not a record token") from exc
        if record.expires < (time.time() if now is None else now):
            raise TokenError("a record token that has expired; search again for a fresh one")
        return record

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self.key, b"faceaudit.record/1\n" + payload, hashlib.sha256).digest()


@dataclass(slots=True)
class ErasureRequest:
    request_id: str
    status: str
    created_at: str
    updated_at: str
    face_ids: list[int] = field(default_factory=list)
    index_version: str = ""
    contact: str | None = None
    faces_erased: int | None = None

    def public(self) -> dict:
        """What the requester sees: never the face_ids of others, only the status."""
        return {"request_id": self.request_id, "status": self.status, "updated_at": self.updated_at}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_request_id(request_id: str) -> str:
    if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
        raise QueryError("not a request id")
    return request_id


class RequestStore:
    """``<index>/_requests/``: one folder per request, every file create-only."""

    def __init__(self, index_root: str):
        self.root = storage.join(index_root.rstrip("/"), REQUESTS)

    def create(self, face_ids: list[int], index_version: str, contact: str | None = None) -> ErasureRequest:
        if not face_ids:
            raise QueryError("an erasure request names at least one record")
        if contact is not None:
            contact = contact.strip()[:MAX_CONTACT] or None
        request_id = secrets.token_hex(16)
        now = _now()
        body = {
            "request_id": request_id,
            "created_at": now,
            "face_ids": sorted({int(i) for i in face_ids}),
            "index_version": index_version,
            "contact": contact,
        }
        storage.write_atomic(self._file(request_id, "request.json"), _json(body), create_only=True)
        return ErasureRequest(request_id, "received", now, now, body["face_ids"], index_version, contact)

    def get(self, request_id: str) -> ErasureRequest | None:
        uri = self._file(check_request_id(request_id), "request.json")
        if not storage.exists(uri):
            return None
        body = json.loads(storage.read_bytes(uri))
        request = ErasureRequest(
            body["request_id"],
            "received",
            body["created_at"],
            body["created_at"],
            [int(i) for i in body["face_ids"]],
            body.get("index_version", ""),
            body.get("contact"),
        )
        decision = self._file(request_id, "decision.json")
        if storage.exists(decision):
            d = json.loads(storage.read_bytes(decision))
            request.status, request.updated_at = d["status"], d["decided_at"]
            request.faces_erased = d.get("faces_erased")
        return request

    def list(self) -> list[ErasureRequest]:
        if not storage.exists(self.root):
            return []
        found = [self.get(name) for name in sorted(storage.listdir(self.root)) if REQUEST_ID.fullmatch(name)]
        return sorted((r for r in found if r is not None), key=lambda r: r.created_at)

    def decide(self, request_id: str, status: str, faces_erased: int | None = None) -> ErasureRequest:
        if status not in ("erased", "rejected"):
            raise QueryError(f"a decision is erased or rejected, not {status!r}")
        request = self.get(request_id)
        if request is None:
            raise QueryError(f"no erasure request {request_id}")
        if request.status != "received":
            raise QueryError(f"request {request_id} was already decided: {request.status}")
        body = {"status": status, "decided_at": _now(), "faces_erased": faces_erased}
        storage.write_atomic(self._file(request_id, "decision.json"), _json(body), create_only=True)
        request.status, request.updated_at, request.faces_erased = status, body["decided_at"], faces_erased
        return request

    def _file(self, request_id: str, name: str) -> str:
        return storage.join(self.root, check_request_id(request_id), name)


def _json(body: dict) -> bytes:
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def approve(index_uri: str, request_id: str, log_uri: str | None = None):
    """Erase the request's faces (``indexing.erase`` by face_id), then record the decision."""
    from .erase import erase, find_by_ids, index_root
    from .search import open_index

    store = RequestStore(index_root(index_uri))
    request = store.get(request_id)
    if request is None:
        raise QueryError(f"no erasure request {request_id}")
    if request.status != "received":
        raise QueryError(f"request {request_id} was already decided: {request.status}")
    idx = open_index(index_uri, erasure_log=log_uri)
    try:
        found, _ = find_by_ids(idx, request.face_ids)
    finally:
        idx.close()
    report = erase(index_uri, found, request.face_ids, (), log_uri)
    return store.decide(request_id, "erased", len({f.face_id for f in found})), report
