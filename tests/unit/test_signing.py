"""Ed25519 manifest signatures (indexing/signing.py) and how bundle.seal and parse_manifest use them."""

from __future__ import annotations

import base64
import json
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from indexing import bundle, signing
from indexing.errors import IntegrityError
from pipelines.core.errors import ConfigError

BODY = {"format": bundle.FORMAT, "version": "20260101T000000Z-0123abcd", "shards": [], "nprobe": 8}


@pytest.fixture
def keys(tmp_path):
    private, public = signing.keygen(tmp_path / "keys")
    return signing.load_private_key(private), signing.load_public_key(public), private, public


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path):
    private, public = signing.keygen(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    key = signing.load_private_key(private)
    assert signing.raw_public(key.public_key()) == signing.raw_public(signing.load_public_key(public))
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        signing.keygen(tmp_path / "k")
    assert private.read_bytes() == key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_the_signed_bytes_are_the_domain_then_the_canonical_body_without_checksum_or_signature():
    manifest = {**BODY, "checksum": "x" * 64, "signature": {"anything": 1}, "é": [1.5, None]}
    expected = (
        b"faceaudit.index/1 manifest signature\n"
        b'{"format":"faceaudit.index/1","nprobe":8,"shards":[],'
        b'"version":"20260101T000000Z-0123abcd","\\u00e9":[1.5,null]}'
    )
    assert signing.signed_bytes(manifest) == expected


def test_a_body_that_json_reads_back_differently_still_verifies(keys):
    private, public, _, _ = keys
    body = {**BODY, "counts": {10: 1, 2: 3}, "pair": (1, 2.0)}  # int keys sort otherwise once read
    signing.check(bundle.parse_manifest(bundle.seal(body, private)), public)


def test_a_sealed_signed_manifest_verifies_and_any_change_is_refused(keys):
    private, public, _, _ = keys
    raw = bundle.seal(BODY, private)
    manifest = bundle.parse_manifest(raw)
    assert manifest["signature"]["algorithm"] == "ed25519"
    assert base64.b64decode(manifest["signature"]["public_key"]) == signing.raw_public(public)
    signing.check(manifest, public)  # no error
    # the attacker changes a field and reseals the (unkeyed) checksum: the signature no longer fits
    body = json.loads(raw)
    body.pop("checksum")
    body["nprobe"] = 1
    resealed = json.dumps({**body, "checksum": bundle.checksum(body)}).encode()
    with pytest.raises(IntegrityError, match="does not verify") as caught:
        signing.check(bundle.parse_manifest(resealed), public)
    assert caught.value.file == "manifest.json"


def test_unsigned_or_other_key_or_malformed_signatures_are_refused_when_a_key_is_configured(keys):
    private, public, _, _ = keys
    unsigned = bundle.parse_manifest(bundle.seal(BODY, None))
    assert "signature" not in unsigned
    signing.check(unsigned, None)  # no key configured: accepted
    with pytest.raises(IntegrityError, match="not signed"):
        signing.check(unsigned, public)
    other = bundle.parse_manifest(bundle.seal(BODY, Ed25519PrivateKey.generate()))
    with pytest.raises(IntegrityError, match="signed by key .* not by the configured key"):
        signing.check(other, public)
    good = bundle.parse_manifest(bundle.seal(BODY, private))
    for broken in (
        {**good["signature"], "algorithm": "rsa"},
        {**good["signature"], "value": "!!"},
        {**good["signature"], "value": base64.b64encode(b"short").decode()},
        "a string",
    ):
        with pytest.raises(IntegrityError, match="signature"):
            signing.check({**good, "signature": broken}, public)


def test_sealing_without_a_key_keeps_a_signature_that_still_fits_and_drops_a_stale_one(keys, monkeypatch):
    monkeypatch.delenv(signing.ENV_SIGNING_KEY, raising=False)
    private, public, _, _ = keys
    signed = bundle.parse_manifest(bundle.seal(BODY, private))
    same = bundle.parse_manifest(bundle.seal(signed))  # e.g. an export that changes nothing
    signing.check(same, public)
    changed = bundle.parse_manifest(bundle.seal({**signed, "nprobe": 2}))  # e.g. an erasure without a key
    assert "signature" not in changed
    with pytest.raises(IntegrityError, match="not signed"):
        signing.check(changed, public)


def test_keys_come_from_the_environment_and_commands_override_them(keys, tmp_path, monkeypatch):
    private, public, private_path, public_path = keys
    monkeypatch.setenv(signing.ENV_SIGNING_KEY, str(private_path))
    monkeypatch.setenv(signing.ENV_PUBLIC_KEY, str(public_path))
    assert signing.public_key() is not None
    signing.check(bundle.parse_manifest(bundle.seal(BODY)), signing.public_key())  # env key signed it
    other = Ed25519PrivateKey.generate()
    with signing.signing_with(other):
        manifest = bundle.parse_manifest(bundle.seal(BODY))
    with pytest.raises(IntegrityError, match="not by the configured key"):
        signing.check(manifest, signing.public_key())
    monkeypatch.delenv(signing.ENV_SIGNING_KEY)
    monkeypatch.delenv(signing.ENV_PUBLIC_KEY)
    assert signing.signing_key() is None and signing.public_key() is None
    assert "signature" not in bundle.parse_manifest(bundle.seal(BODY))


def test_bad_key_files_are_clear_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the signing key"):
        signing.load_private_key(tmp_path / "missing.pem")
    x25519 = tmp_path / "x25519.pem"
    x25519.write_bytes(
        X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        signing.load_private_key(x25519)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        signing.load_public_key(junk)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        signing.load_private_key(junk)
