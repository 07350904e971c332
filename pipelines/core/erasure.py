"""The erasure log: which faces a person had erased, as salted hashes only.

A log is a folder (local or ``gs://``), by default ``<index>/_erasure/``:

```
<log>/SALT                      32 random bytes (hex), created once, create-only; a secret (0600)
<log>/entries/<time>-<rand>.json one object per erasure, create-only: the log is append-only
```

An entry holds keyed BLAKE2b hashes (the salt is the key) of the erased ``face_id``s, of the
images those faces are in, and of images erased whole (every face of the image, whatever the
model). It never holds an embedding, pixels, a URI or an id in clear. Ingest, index build, search
and the erase sweep load the log as an ``ErasureSet`` and test ids against it.

Pure: storage only, no engine, no faiss.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pyarrow as pa

from . import storage
from .errors import FatalError

FORMAT = "faceaudit.erasure/1"
LOG_DIR = "_erasure"  # default place of the log, under an index root
SALT = "SALT"
ENTRIES = "entries"
RUN_POINTER = "_erasure_log.json"  # in a run folder: which log the run's ingest honours
DIGEST_BYTES = 16


def default_log(index_root: str) -> str:
    return storage.join(index_root, LOG_DIR)


@dataclass(frozen=True, slots=True)
class Keys:
    """Keyed hashes of ids; without the salt, a hash cannot be tested against a guessed id."""

    salt: bytes

    def face(self, face_id: int) -> str:
        return self._hash(b"face", int(face_id).to_bytes(8, "big", signed=True))

    def image(self, image_sha256: str) -> str:
        return self._hash(b"image", bytes.fromhex(image_sha256))

    def _hash(self, kind: bytes, data: bytes) -> str:
        return hashlib.blake2b(data, digest_size=DIGEST_BYTES, key=self.salt, person=kind).hexdigest()


@dataclass(frozen=True, slots=True)
class ErasureSet:
    """Everything a log names: test face_ids and image shas against it."""

    keys: Keys | None = None
    faces: frozenset[str] = frozenset()
    images: frozenset[str] = frozenset()  # images holding an erased face
    whole_images: frozenset[str] = frozenset()  # images erased whole
    entries: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.faces or self.whole_images)

    def face_erased(self, face_id: int, image_sha256: str | None = None) -> bool:
        if not self or self.keys is None:
            return False
        if self.keys.face(face_id) in self.faces:
            return True
        return bool(image_sha256 and self.whole_images and self.keys.image(image_sha256) in self.whole_images)

    def mask(self, face_ids: Iterable[int], image_shas: Iterable[str | None] | None = None) -> np.ndarray:
        """True where the face (or its whole image) is erased."""
        ids = np.asarray(list(face_ids) if not isinstance(face_ids, np.ndarray) else face_ids, dtype=np.int64)
        if not self or self.keys is None or ids.size == 0:
            return np.zeros(ids.shape, dtype=bool)
        face = self.keys.face
        out = np.array([face(int(i)) in self.faces for i in ids.ravel()], dtype=bool)
        if self.whole_images and image_shas is not None:
            image = self.keys.image
            out |= np.array([s is not None and image(s) in self.whole_images for s in image_shas], dtype=bool)
        return out.reshape(ids.shape)


EMPTY = ErasureSet()


@dataclass(slots=True)
class Entry:
    """One erasure: what is written to the log (hashes only)."""

    faces: list[str]
    images: list[str]
    whole_images: list[str] = field(default_factory=list)

    def body(self) -> dict:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return {
            "format": FORMAT,
            "created_at": now,
            "faces": sorted(set(self.faces)),
            "images": sorted(set(self.images)),
            "whole_images": sorted(set(self.whole_images)),
        }


class ErasureLog:
    """An append-only log folder. ``append`` writes one create-only entry; ``load`` reads them all."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")

    def keys(self, create: bool = False) -> Keys | None:
        """The log's salt; created (once, create-only) when ``create`` and absent."""
        uri = storage.join(self.uri, SALT)
        if storage.exists(uri):
            storage.restrict(uri)  # a secret: 0600 (new ones are created so; older ones are fixed here)
            return Keys(_parse_salt(storage.read_text(uri), uri))
        if not create:
            return None
        try:
            storage.write_atomic(uri, (secrets.token_hex(32) + "\n").encode(), create_only=True)
        except storage.AlreadyExists:
            pass  # another eraser created it first: use theirs
        return Keys(_parse_salt(storage.read_text(uri), uri))

    def append(
        self, face_ids: Iterable[int], face_images: Iterable[str], whole_images: Iterable[str] = ()
    ) -> str:
        """Record an erasure; returns the entry's name. Written before anything is removed."""
        keys = self.keys(create=True)
        assert keys is not None
        entry = Entry(
            [keys.face(i) for i in face_ids],
            [keys.image(s) for s in face_images],
            [keys.image(s) for s in whole_images],
        )
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{stamp}-{secrets.token_hex(4)}.json"  # sortable by time, unique without coordination
        data = json.dumps(entry.body(), indent=1, sort_keys=True).encode()
        storage.write_atomic(storage.join(self.uri, ENTRIES, name), data, create_only=True)
        return name

    def entry_names(self) -> list[str]:
        return [
            n
            for n in storage.listdir(storage.join(self.uri, ENTRIES))
            if n.endswith(".json") and storage.TMP_MARK not in n
        ]

    def load(self) -> ErasureSet:
        names = self.entry_names()
        if not names:
            return EMPTY
        keys = self.keys()
        if keys is None:
            raise FatalError(f"erasure log {self.uri} has entries but no {SALT}; it cannot be checked")
        faces: set[str] = set()
        images: set[str] = set()
        whole: set[str] = set()
        for name in names:
            body = _read_entry(storage.join(self.uri, ENTRIES, name))
            faces.update(body["faces"])
            images.update(body.get("images", []))
            whole.update(body.get("whole_images", []))
        return ErasureSet(keys, frozenset(faces), frozenset(images), frozenset(whole), tuple(names))


def _parse_salt(text: str, uri: str) -> bytes:
    try:
        salt = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise FatalError(f"{uri} is not a hex salt") from exc
    if len(salt) < 16:
        raise FatalError(f"{uri} holds a salt of {len(salt)} bytes; expected 32")
    return salt


def _read_entry(uri: str) -> dict:
    try:
        body = json.loads(storage.read_bytes(uri))
    except ValueError as exc:
        raise FatalError(f"erasure log entry {uri} is not valid JSON") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("faces"), list):
        raise FatalError(f"erasure log entry {uri} is not a {FORMAT} entry")
    return body


def load(uri: str | None) -> ErasureSet:
    """The set a log names; empty when ``uri`` is None or the log does not exist yet."""
    return ErasureLog(uri).load() if uri else EMPTY


# ---------------------------------------------------------------- ingest


def point_run(run: str, log_uri: str | None) -> None:
    """Tell every worker that commits into ``run`` which log to honour (engines share no config)."""
    pointer = storage.join(run, RUN_POINTER)
    if log_uri:
        storage.write_atomic(pointer, json.dumps({"erasure_log": log_uri}).encode())
    elif storage.exists(pointer):
        storage.remove(pointer)


def _run_set(run: str) -> ErasureSet:
    pointer = storage.join(run, RUN_POINTER)
    if not storage.exists(pointer):
        return EMPTY
    log = ErasureLog(json.loads(storage.read_bytes(pointer))["erasure_log"])
    # listed at every commit, so an erasure made while a run ingests is honoured from then on
    return _cached_load(log.uri, tuple(log.entry_names()))


@lru_cache(maxsize=8)
def _cached_load(uri: str, names: tuple[str, ...]) -> ErasureSet:
    return ErasureLog(uri).load() if names else EMPTY


def drop_erased(run: str, faces: pa.Table) -> pa.Table:
    """A unit's faces table minus the faces the run's erasure log names (loaded once per process)."""
    if faces.num_rows == 0:
        return faces
    erased = _run_set(run)
    if not erased:
        return faces
    mask = erased.mask(faces.column("face_id").to_numpy(), faces.column("image_sha256").to_pylist())
    return faces.filter(pa.array(~mask)) if mask.any() else faces
