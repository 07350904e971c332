"""Hostile index bundles: whoever can write the bucket can rewrite a manifest and reseal its
(unkeyed) checksum. Each attack must be refused with an IntegrityError, before faiss or numpy
parses anything (both are patched to fail if called) and without writing outside the cache.

Covered: a manifest version or file name that steers the download path (``/home/u/.ssh``,
``../../x``), CURRENT naming ``..``, a symlink planted in the cache, a remote file that does not
match its sha256 (never renamed into place), declared sizes larger than the files (faiss codes,
block lists, on-disk lists, .npy shapes, the manifest's ``bytes``), a ``match_threshold`` outside
(0, 1), and Ed25519 signatures end to end (build, verify, export, rebuild, keygen).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from indexing import BuildOptions, IntegrityError, build_index, bundle, open_index, signing, synthetic
from indexing.erase import bundles as erase_bundles
from pipelines.cli import app
from pipelines.core import storage
from pipelines.core.errors import ConfigError

DIM = 16
SMALL = dict(flat_max=0, nlist=8, recall_queries=50)
BUCKET = "bundle-attacks"
MAX_GROWTH = 256 << 20  # peak RSS may not grow by more than this while a hostile bundle is refused


def vectors(n: int, seed: int = 3) -> np.ndarray:
    return np.concatenate(list(synthetic.clustered(n, DIM, clusters=20, seed=seed)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    synthetic.write_run(str(out), "run-a", iter([vectors(600)]), DIM)
    return out


def build(runs: Path, root: Path, **opts) -> Path:
    build_index([str(runs)], str(root), BuildOptions(**opts))
    return root


@pytest.fixture(scope="module")
def flat(runs, tmp_path_factory) -> Path:
    """IDMap,Flat: the index of small collections."""
    return build(runs, tmp_path_factory.mktemp("flat") / "index")


@pytest.fixture(scope="module")
def fastscan(runs, tmp_path_factory) -> Path:
    """IVF with 4-bit fast-scan PQ (block inverted lists) and a float16 re-rank store."""
    return build(runs, tmp_path_factory.mktemp("pq") / "index", max_bytes_per_vector=16, **SMALL)


@pytest.fixture(scope="module")
def ondisk(runs, tmp_path_factory) -> Path:
    """IVF-Flat with its inverted lists in a memory-mapped .ivfdata file."""
    return build(runs, tmp_path_factory.mktemp("ondisk") / "index", on_disk=True, **SMALL)


@pytest.fixture
def no_parsing(monkeypatch):
    """faiss.read_index and numpy.load fail the test if a hostile bundle reaches them."""
    calls = []

    def refuse(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called on a hostile bundle")

        return fail

    monkeypatch.setattr(faiss, "read_index", refuse("faiss.read_index"))
    monkeypatch.setattr(np, "load", refuse("numpy.load"))
    monkeypatch.delenv(signing.ENV_PUBLIC_KEY, raising=False)
    monkeypatch.delenv(signing.ENV_SIGNING_KEY, raising=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield calls
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < MAX_GROWTH, f"peak memory grew by {grown / 1e6:.0f} MB"
    assert not calls


# ---------------------------------------------------------------- how an attacker rewrites a bundle


def copy_root(root: Path, dst: Path) -> tuple[Path, str]:
    shutil.copytree(root, dst)
    version = (dst / "CURRENT").read_text().strip()
    return dst / version, version


def read_manifest(folder: Path) -> dict:
    body = json.loads((folder / "manifest.json").read_text())
    body.pop("checksum")
    return body


def reseal(folder: Path, body: dict) -> None:
    """What anyone with write access can do: recompute the unkeyed checksum."""
    body = {k: v for k, v in body.items() if k != "checksum"}
    (folder / "manifest.json").write_text(json.dumps({**body, "checksum": bundle.checksum(body)}, indent=2))


def rewrite_file(folder: Path, name: str, data: bytes) -> None:
    """Replace a bundle file and reseal the manifest with its new sha256 and size."""
    (folder / name).write_bytes(data)
    body = read_manifest(folder)
    for entry in bundle.bundle_files(body):
        if entry["file"] == name:
            entry.update(bundle.file_entry(str(folder), name))
    reseal(folder, body)


def patch_u64(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack("<Q", value) + data[offset + 8 :]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ---------------------------------------------------------------- remote bundles (fake-gcs-server)


@pytest.fixture(scope="module")
def emulator(gcs_emulator):
    return gcs_emulator


@pytest.fixture(scope="module")
def bucket(emulator) -> str:
    return emulator.make_bucket(BUCKET)


def upload(emulator, uri: str, data: bytes) -> None:
    """A raw upload under exactly the object name ``uri`` names, independent of the code under test."""
    name = uri.removeprefix(f"gs://{BUCKET}/")
    response = emulator.upload(BUCKET, name, data, None)
    assert response.status_code == 200, response.text


def upload_root(emulator, root: Path, uri: str) -> None:
    for path in files_under(root):
        upload(emulator, storage.join(uri, path.relative_to(root).as_posix()), path.read_bytes())


@pytest.mark.parametrize("version", ["ABSOLUTE", "../../escaped", "..", "a/b", ".hidden/../x"])
def test_a_manifest_version_cannot_steer_the_download_out_of_the_cache(
    flat,
    tmp_path,
    emulator,
    bucket,
    version,
    no_parsing,
):
    victim = tmp_path / "home" / "u" / ".ssh"
    version = str(victim) if version == "ABSOLUTE" else version
    folder, real = copy_root(flat, tmp_path / "attacker")
    body = read_manifest(folder)
    body["version"] = version
    reseal(folder, body)
    remote = storage.join(bucket, tmp_path.name, "index")
    upload_root(emulator, tmp_path / "attacker", remote)
    cache = tmp_path / "cache" / "faceaudit" / "index"
    with pytest.raises(IntegrityError, match="version") as caught:
        open_index(remote, cache_dir=str(cache))
    assert caught.value.file == "manifest.json"
    assert not victim.exists() and not (tmp_path / "cache" / "escaped").exists()
    assert not (tmp_path / "escaped").exists()
    assert files_under(tmp_path / "cache") == []  # nothing downloaded at all


@pytest.mark.parametrize(
    "name", ["../../home/u/.ssh/authorized_keys", "ABSOLUTE", "authorized_keys", "store/../../x.npy"]
)
def test_a_manifest_file_name_cannot_steer_a_download_or_a_read(
    flat,
    tmp_path,
    emulator,
    bucket,
    name,
    no_parsing,
):
    victim = tmp_path / "home" / "u" / ".ssh" / "authorized_keys"
    name = str(victim) if name == "ABSOLUTE" else name
    folder, version = copy_root(flat, tmp_path / "attacker")
    payload = b"ssh-ed25519 AAAA attacker\n"
    body = read_manifest(folder)
    body["shards"][0]["ids"] = {
        "file": name,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "bytes": len(payload),
    }
    reseal(folder, body)
    remote = storage.join(bucket, tmp_path.name, "index")
    upload_root(emulator, tmp_path / "attacker", remote)
    upload(emulator, storage.join(remote, version, name), payload)  # the object the name reaches
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError, match="not a bundle file name"):
        open_index(remote, cache_dir=str(cache))
    assert not victim.exists() and files_under(cache) == []
    with pytest.raises(IntegrityError, match="not a bundle file name"):  # and in place, locally
        open_index(str(tmp_path / "attacker"))
    assert not victim.exists()


@pytest.mark.parametrize("current", ["..", "../..", "x/../..", "/etc", " ", "v\n2"])
def test_current_must_name_a_version(flat, tmp_path, current, no_parsing):
    folder, _ = copy_root(flat, tmp_path / "index")
    root = folder / "root"  # CURRENT ".." would open the version folder above it
    root.mkdir()
    (root / "CURRENT").write_text(current + "\n")
    with pytest.raises(IntegrityError) as caught:
        open_index(str(root))
    assert caught.value.file == "CURRENT"


def test_a_symlink_planted_in_the_cache_is_not_followed(flat, tmp_path, emulator, bucket, no_parsing):
    remote = storage.join(bucket, tmp_path.name, "index")
    upload_root(emulator, flat, remote)
    version = (flat / "CURRENT").read_text().strip()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / version).symlink_to(elsewhere)
    with pytest.raises(IntegrityError, match="resolves outside"):
        open_index(remote, cache_dir=str(cache))
    assert files_under(elsewhere) == []


def test_a_download_is_renamed_into_the_cache_only_once_every_sha256_matches(
    flat,
    tmp_path,
    emulator,
    bucket,
    monkeypatch,
):
    monkeypatch.delenv(signing.ENV_PUBLIC_KEY, raising=False)
    remote = storage.join(bucket, tmp_path.name, "index")
    upload_root(emulator, flat, remote)
    version = (flat / "CURRENT").read_text().strip()
    damaged = bytearray((flat / version / "metadata" / "part-0.parquet").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, not resealed
    upload(emulator, storage.join(remote, version, "metadata/part-0.parquet"), bytes(damaged))
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError, match="sha256") as caught:
        open_index(remote, cache_dir=str(cache))
    assert caught.value.file == "metadata/part-0.parquet"
    assert os.listdir(cache) == []  # no version folder, no partial download left behind
    # repaired: the copy appears whole, and a second open uses it as it is
    good = (flat / version / "metadata" / "part-0.parquet").read_bytes()
    upload(emulator, storage.join(remote, version, "metadata/part-0.parquet"), good)
    index = open_index(remote, cache_dir=str(cache))
    assert os.listdir(cache) == [version] and index.ntotal == 600
    assert open_index(remote, cache_dir=str(cache)).ntotal == 600


def test_a_configured_public_key_refuses_an_unsigned_remote_bundle_before_any_download(
    flat,
    tmp_path,
    emulator,
    bucket,
    monkeypatch,
    no_parsing,
):
    _, public = signing.keygen(tmp_path / "keys")
    remote = storage.join(bucket, tmp_path.name, "index")
    upload_root(emulator, flat, remote)
    monkeypatch.setenv(signing.ENV_PUBLIC_KEY, str(public))
    with pytest.raises(IntegrityError, match="not signed"):
        open_index(remote, cache_dir=str(tmp_path / "cache"))
    assert files_under(tmp_path / "cache") == []


# ---------------------------------------------------------------- declared sizes


def flat_codes(data: bytes) -> int:
    """Offset of the flat codes' length (counted in floats): after "IxFI" and its 33-byte header."""
    return data.index(b"IxFI") + 4 + 33


def first_block_codes(data: bytes) -> int:
    """Offset of the first block list's codes length: "ilbl", 4 uint64 fields, the ids vector."""
    ids_at = data.index(b"ilbl") + 4 + 32
    (n_ids,) = struct.unpack_from("<Q", data, ids_at)
    return ids_at + 8 + 8 * n_ids


@pytest.mark.parametrize(
    "bundle_kind, attack",
    [
        ("flat", "flat codes 2^31"),
        ("fastscan", "block list codes 2^31"),
        ("ondisk", "on-disk lists map past the .ivfdata file"),
        ("fastscan", "manifest bytes 2^40"),
        ("fastscan", "ids .npy shape 2^40"),
        ("fastscan", "vectors .npy shape 2^31 rows"),
        ("flat", "trailing bytes after the index"),
    ],
)
def test_declared_sizes_are_checked_before_faiss_or_numpy_parse_anything(
    flat, fastscan, ondisk, tmp_path, bundle_kind, attack, no_parsing
):
    roots = {"flat": flat, "fastscan": fastscan, "ondisk": ondisk}  # built before faiss is patched
    folder, _ = copy_root(roots[bundle_kind], tmp_path / "index")
    shard = read_manifest(folder)["shards"][0]
    index_name = shard["index"]["file"]
    data = (folder / index_name).read_bytes()
    if attack == "flat codes 2^31":
        rewrite_file(folder, index_name, patch_u64(data, flat_codes(data), 1 << 31))
        bad = index_name
    elif attack == "block list codes 2^31":
        rewrite_file(folder, index_name, patch_u64(data, first_block_codes(data), 1 << 31))
        bad = index_name
    elif attack == "on-disk lists map past the .ivfdata file":
        rewrite_file(folder, index_name, patch_u64(data, len(data) - 8, 1 << 40))  # totsize: the last field
        bad = index_name
    elif attack == "manifest bytes 2^40":
        body = read_manifest(folder)
        body["shards"][0]["index"]["bytes"] = 1 << 40
        reseal(folder, body)
        bad = index_name
    elif attack == "trailing bytes after the index":
        rewrite_file(folder, index_name, data + b"\0" * 64)
        bad = index_name
    else:
        key = "ids" if attack.startswith("ids") else "vectors"
        bad = shard[key]["file"]
        raw = (folder / bad).read_bytes()
        header_len = raw.index(b"\n") + 1
        header = raw[:header_len].decode("latin-1")
        shape = f"({1 << 40},)" if key == "ids" else f"({1 << 31}, {DIM})"
        start, end = (
            header.index("'shape': ") + len("'shape': "),
            header.index(")", header.index("'shape'")) + 1,
        )
        new = (header[:start] + shape + header[end:]).rstrip("\n").rstrip(" ")
        new = new + " " * (header_len - 1 - len(new)) + "\n"
        assert len(new) == header_len
        rewrite_file(folder, bad, new.encode("latin-1") + raw[header_len:])
    with pytest.raises(IntegrityError) as caught:
        open_index(str(tmp_path / "index"))
    assert caught.value.file == bad, str(caught.value)
    with pytest.raises(IntegrityError):  # sha256 skipped: the sizes are checked all the same
        open_index(str(tmp_path / "index"), verify=False)


def test_every_kind_of_bundle_passes_the_size_check(flat, fastscan, ondisk):
    for root in (flat, fastscan, ondisk):
        folder = root / (root / "CURRENT").read_text().strip()
        bundle.check_declared(str(folder), bundle.parse_manifest((folder / "manifest.json").read_bytes()))


# ---------------------------------------------------------------- match_threshold


@pytest.mark.parametrize("threshold", [0, 0.0, -0.5, 1, 1.0, 7.5, None, "0.5", True, "missing"])
def test_a_match_threshold_outside_zero_one_is_refused(flat, tmp_path, threshold, no_parsing):
    folder, _ = copy_root(flat, tmp_path / "index")
    body = read_manifest(folder)
    if threshold == "missing":
        del body["match_threshold"]
    else:
        body["match_threshold"] = threshold
    reseal(folder, body)
    with pytest.raises(IntegrityError, match="match_threshold"):
        open_index(str(tmp_path / "index"))


def test_search_and_erase_refuse_a_zero_threshold_and_erase_nothing(flat, tmp_path, monkeypatch):
    monkeypatch.delenv(signing.ENV_PUBLIC_KEY, raising=False)
    folder, _ = copy_root(flat, tmp_path / "index")
    body = read_manifest(folder)
    body["match_threshold"] = 0.0
    reseal(folder, body)
    photo = tmp_path / "me.jpg"
    photo.write_bytes(b"\xff\xd8\xff")
    before = files_under(tmp_path / "index")
    cli = CliRunner()
    searched = cli.invoke(app, ["search", "--index", str(tmp_path / "index"), str(photo)])
    assert searched.exit_code == 1 and "match_threshold" in searched.output
    erased = cli.invoke(app, ["erase", "--index", str(tmp_path / "index"), "--photo", str(photo), "--yes"])
    assert erased.exit_code == 1 and "match_threshold" in erased.output
    assert files_under(tmp_path / "index") == before  # nothing erased, no log entry written


# ---------------------------------------------------------------- signatures end to end


@pytest.fixture(scope="module")
def keypair(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys") / "keys"
    result = CliRunner().invoke(app, ["keygen", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    private, public = folder / signing.PRIVATE_FILE, folder / signing.PUBLIC_FILE
    assert oct(private.stat().st_mode & 0o777) == "0o600" and public.exists()
    return private, public


def test_build_verify_and_export_with_signatures(runs, flat, tmp_path, keypair, monkeypatch):
    monkeypatch.delenv(signing.ENV_PUBLIC_KEY, raising=False)
    monkeypatch.delenv(signing.ENV_SIGNING_KEY, raising=False)
    private, public = keypair
    cli = CliRunner()
    signed = tmp_path / "signed"
    run = str(runs / "runs" / "run-a")
    built = cli.invoke(
        app, ["index", "build", "--runs", run, "--out", str(signed), "--signing-key", str(private)]
    )
    assert built.exit_code == 0, built.output
    ok = cli.invoke(app, ["verify", str(signed), "--public-key", str(public)])
    assert ok.exit_code == 0 and ok.output.startswith("ok:"), ok.output
    assert open_index(str(signed), public_key=str(public)).ntotal == 600
    # an unsigned bundle, and a signed one an attacker changed and resealed, are refused
    unsigned = cli.invoke(app, ["verify", str(flat), "--public-key", str(public)])
    assert unsigned.exit_code == 1 and "not signed" in unsigned.output
    with pytest.raises(IntegrityError, match="not signed"):
        open_index(str(flat), public_key=public.read_bytes())
    folder, _ = copy_root(signed, tmp_path / "tampered")
    body = read_manifest(folder)
    body["match_threshold"] = 0.01
    reseal(folder, body)
    with pytest.raises(IntegrityError, match="does not verify"):
        open_index(str(tmp_path / "tampered"), public_key=str(public))
    assert open_index(str(tmp_path / "tampered")).ntotal == 600  # no key configured: not checked
    # exports: signed with a key; without one, kept only while the body is unchanged
    for args, verdict in (
        (["--signing-key", str(private), "--shards", "2"], 0),
        ([], 0),
        (["--shards", "2"], 1),
    ):
        to = tmp_path / f"export-{len(args)}"
        exported = cli.invoke(
            app, ["export", "--index", str(signed), "--to", str(to), "--public-key", str(public), *args]
        )
        assert exported.exit_code == 0, exported.output
        checked = cli.invoke(app, ["verify", str(to), "--public-key", str(public)])
        assert checked.exit_code == verdict, (args, checked.output)
    refused = cli.invoke(
        app, ["export", "--index", str(flat), "--to", str(tmp_path / "x"), "--public-key", str(public)]
    )
    assert refused.exit_code == 1 and "not signed" in refused.output and not (tmp_path / "x").exists()


def test_a_bad_signing_key_fails_before_any_work(runs, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "index",
            "build",
            "--runs",
            str(runs),
            "--out",
            str(tmp_path / "i"),
            "--signing-key",
            str(tmp_path / "no.pem"),
        ],
    )
    assert result.exit_code == 1 and "cannot read the signing key" in result.output
    assert not (tmp_path / "i").exists()


def test_rebuild_signs_what_it_seals(tmp_path, keypair, monkeypatch):
    from pipelines.rebuild import driver

    private, public = keypair
    sealed = []

    def fake_rebuild(cfg):
        sealed.append(bundle.seal({"format": bundle.FORMAT, "shards": [], "version": "v1"}))
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(driver, "rebuild", fake_rebuild)
    monkeypatch.delenv(signing.ENV_SIGNING_KEY, raising=False)
    args = ["rebuild", "--index", str(tmp_path / "i"), "--work", str(tmp_path / "w")]
    result = CliRunner().invoke(app, [*args, "--signing-key", str(private)])
    assert result.exit_code == 1 and "stopped by the test" in result.output
    signing.check(bundle.parse_manifest(sealed[0]), signing.load_public_key(public))
    missing = CliRunner().invoke(app, [*args, "--signing-key", str(tmp_path / "no.pem")])
    assert missing.exit_code == 1 and "cannot read the signing key" in missing.output and len(sealed) == 1


def test_one_bundle_file_pattern():
    """Erasure deletes unlisted bundle files by the bundle's own pattern; it keeps no copy of it."""
    import inspect

    assert not hasattr(erase_bundles, "BUNDLE_FILE")
    assert "bundle.BUNDLE_FILE" in inspect.getsource(erase_bundles.delete_unlisted)
