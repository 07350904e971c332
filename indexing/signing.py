"""Ed25519 signatures over index bundle manifests: who built a bundle, not only that it is whole.

The manifest's ``checksum`` catches accidents, but anyone who can write the bucket can recompute
it. A signed manifest carries ``signature``::

    {"algorithm": "ed25519", "public_key": <base64 of the 32-byte raw key>, "value": <base64 of the
     64-byte signature>}

over exactly these bytes (``signed_bytes``)::

    b"faceaudit.index/1 manifest signature\\n" + canonical JSON of the manifest without its
    ``checksum`` and ``signature`` fields: json.dumps(body, sort_keys=True, separators=(",", ":"),
    ensure_ascii=True), UTF-8 (ASCII) encoded

The manifest lists every file of the bundle with its sha256 and size, so the signature covers
every byte a reader opens. ``checksum`` is then computed over the body *with* ``signature``.

Keys are PEM files: the private key PKCS#8 (unencrypted; keep it mode 0600), the public key
SubjectPublicKeyInfo. ``keygen`` writes a pair. Writers take the private key from
``--signing-key`` or ``FACEAUDIT_SIGNING_KEY``; readers take the public key from ``public_key=``,
``--public-key`` or ``FACEAUDIT_PUBLIC_KEY``, and then refuse unsigned or badly signed bundles.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipelines.core.errors import ConfigError

from .errors import IntegrityError

log = logging.getLogger(__name__)

ALGORITHM = "ed25519"
DOMAIN = b"faceaudit.index/1 manifest signature\n"
UNSIGNED_FIELDS = ("checksum", "signature")
ENV_SIGNING_KEY = "FACEAUDIT_SIGNING_KEY"
ENV_PUBLIC_KEY = "FACEAUDIT_PUBLIC_KEY"
PRIVATE_FILE = "faceaudit-signing.key.pem"
PUBLIC_FILE = "faceaudit-signing.pub.pem"
MANIFEST = "manifest.json"  # as bundle.MANIFEST (bundle imports this module)
MAX_KEY_FILE = 64 * 1024

PublicKeyLike = Ed25519PublicKey | str | os.PathLike | bytes | None


class KeyFileError(ConfigError):
    """A key file that is missing, unreadable or not an Ed25519 key of the expected kind."""


# ---------------------------------------------------------------- the bytes signed


def unsigned_body(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in UNSIGNED_FIELDS}


def signed_bytes(manifest: dict) -> bytes:
    """The exact bytes a manifest's signature is over (see the module docstring). The body is taken
    as JSON reads it back (a tuple becomes a list, a non-string key a string), so a writer signs
    exactly what a reader will check."""
    body = json.loads(json.dumps(unsigned_body(manifest)))
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return DOMAIN + canonical.encode("ascii")


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | bytes) -> str:
    """A short name for a public key in messages: the first 16 hex of sha256 of its raw bytes."""
    raw = key if isinstance(key, bytes) else raw_public(key)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(manifest: dict, key: Ed25519PrivateKey) -> dict:
    """The ``signature`` field for ``manifest`` (its checksum and any old signature are ignored)."""
    return {
        "algorithm": ALGORITHM,
        "public_key": base64.b64encode(raw_public(key.public_key())).decode(),
        "value": base64.b64encode(key.sign(signed_bytes(manifest))).decode(),
    }


def _parts(signature: object) -> tuple[bytes, bytes]:
    """(raw public key, signature) of a ``signature`` field; IntegrityError when malformed."""
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        raise IntegrityError(MANIFEST, f"its signature is not an {ALGORITHM} signature faceaudit writes")
    try:
        public = base64.b64decode(str(signature.get("public_key")), validate=True)
        value = base64.b64decode(str(signature.get("value")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise IntegrityError(MANIFEST, "its signature is not valid base64") from exc
    if len(public) != 32 or len(value) != 64:
        raise IntegrityError(MANIFEST, "its signature has the wrong length")
    return public, value


def self_consistent(manifest: dict) -> bool:
    """Whether the manifest's signature verifies against the public key it names (no trust implied:
    used to keep a signature that still fits when a manifest is re-sealed without a key)."""
    try:
        public, value = _parts(manifest.get("signature"))
        Ed25519PublicKey.from_public_bytes(public).verify(value, signed_bytes(manifest))
        return True
    except (IntegrityError, InvalidSignature, ValueError):
        return False


def check(manifest: dict, key: Ed25519PublicKey | None) -> None:
    """Refuse, with an IntegrityError naming manifest.json, a manifest that ``key`` did not sign.
    Without a key nothing is checked (unsigned bundles are accepted)."""
    if key is None:
        return
    if "signature" not in manifest:
        raise IntegrityError(
            MANIFEST,
            f"it is not signed, and a public key is configured (key {key_id(key)}); "
            "build or export it with --signing-key",
        )
    public, value = _parts(manifest["signature"])
    if public != raw_public(key):
        raise IntegrityError(
            MANIFEST, f"it is signed by key {key_id(public)}, not by the configured key {key_id(key)}"
        )
    try:
        key.verify(value, signed_bytes(manifest))
    except InvalidSignature as exc:
        raise IntegrityError(MANIFEST, f"its signature does not verify against key {key_id(key)}") from exc


# ---------------------------------------------------------------- keys


def _read_key_file(path: str | os.PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read the {what} {os.fspath(path)!r}: {exc.strerror}") from exc
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"the {what} {os.fspath(path)!r} is too large to be a PEM key")
    return data


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    data = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"the signing key {os.fspath(path)!r} is not an unencrypted PEM private key "
            "(faceaudit keygen writes one)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"the signing key {os.fspath(path)!r} is not an Ed25519 key")
    if os.name == "posix" and os.stat(path).st_mode & 0o077:
        log.warning("signing key %s is readable by other users; chmod 600 it", os.fspath(path))
    return key


def load_public_key(value: Ed25519PublicKey | str | os.PathLike | bytes) -> Ed25519PublicKey:
    """A public key object from itself, PEM bytes or a PEM file's path."""
    if isinstance(value, Ed25519PublicKey):
        return value
    where = "the public key given"
    data = value if isinstance(value, bytes) else _read_key_file(value, "public key")
    if not isinstance(value, bytes):
        where = f"the public key {os.fspath(value)!r}"
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{where} is not a PEM public key (faceaudit keygen writes one)") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where} is not an Ed25519 key")
    return key


def signing_key(path: str | os.PathLike | None = None) -> Ed25519PrivateKey | None:
    """The private key at ``path``, else at ``$FACEAUDIT_SIGNING_KEY``, else None (no signing)."""
    path = path or os.environ.get(ENV_SIGNING_KEY) or None
    return load_private_key(path) if path else None


def public_key(value: PublicKeyLike = None) -> Ed25519PublicKey | None:
    """The public key ``value`` names, else the one at ``$FACEAUDIT_PUBLIC_KEY``, else None."""
    value = value or os.environ.get(ENV_PUBLIC_KEY) or None
    return load_public_key(value) if value is not None else None


_active: list[Ed25519PrivateKey | None] = []


@contextmanager
def signing_with(key: Ed25519PrivateKey | None) -> Iterator[None]:
    """Every manifest sealed inside (a build, rebuild, export) is signed with ``key``; with None,
    the environment's key is used as outside."""
    _active.append(key)
    try:
        yield
    finally:
        _active.pop()


def active_key() -> Ed25519PrivateKey | None:
    """The key ``bundle.seal`` signs with: the innermost ``signing_with``, else the environment's."""
    for key in reversed(_active):
        if key is not None:
            return key
    return signing_key()


def keygen(out: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new key pair into ``out``: the private key (mode 0600) and the public key. Never
    overwrites an existing file."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / PRIVATE_FILE, folder / PUBLIC_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(private_path, 0o600)  # whatever the umask
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(pub)
    return private_path, public_path
