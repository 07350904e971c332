"""The index build on every engine: the per-shard adds as Ray tasks and Beam workers must give the
local build's bundle byte for byte, also when a shard task dies and is retried."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexing import BuildOptions, build_index
from indexing.runs import sha_keys
from pipelines.core.errors import FatalError
from tests.helpers import REPO, kill_once

BEAM_IN_PROCESS = ("--runner=DirectRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1")
# 4-bit PQ with re-ranking in 4 bundle shards: every kind of bundle file, several shard tasks
OPTIONS = BuildOptions(max_bytes_per_vector=40, flat_max=0, nlist=1, vectors_per_shard=20)
TIME_FIELDS = ("version", "created_at", "build_seconds", "build_phases", "checksum")


def engine_runner(engine: str):
    """The ShardRunner of ``engine`` (None: the local build)."""
    if engine == "ray":
        from indexing.build_ray import make_runner

        return make_runner()
    if engine == "beam":
        from indexing.build_beam import make_runner

        return make_runner(BEAM_IN_PROCESS)
    return None


def bundle_digests(root: Path) -> tuple[str, dict[str, str], dict]:
    """(version, sha256 of every file but the manifest, the manifest without time-dependent fields)."""
    version = (root / "CURRENT").read_text().strip()
    folder = root / version
    files = {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    manifest = json.loads((folder / "manifest.json").read_text())
    return version, files, {k: v for k, v in manifest.items() if k not in TIME_FIELDS}


def assert_same_bundle(root: Path, expected: Path, ignore: tuple[str, ...] = ()) -> None:
    """The same files with the same sha256s, the same manifest but for its time fields (and
    ``ignore``), nothing left behind by the build; with the same inputs, the same version digest."""
    version, files, manifest = bundle_digests(root)
    want_version, want_files, want_manifest = bundle_digests(expected)
    assert files == want_files
    for key in ignore:
        manifest.pop(key), want_manifest.pop(key)
    assert manifest == want_manifest
    if not ignore:
        assert version.split("-")[-1] == want_version.split("-")[-1]  # time-digest: the digest part
    leftovers = [p.name for p in root.rglob("*") if ".tmp-" in p.name or p.name == "_build"]
    assert not leftovers


@pytest.fixture(scope="module")
def local_bundle(faces_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index-local")
    result = build_index([faces_run.uri], str(out), OPTIONS)
    assert len(result.manifest["shards"]) == 4 and result.manifest["factory"] == "IVF1,PQ64x4fs"
    return out


@pytest.mark.parametrize("engine", ["ray", "beam"])
def test_every_engine_builds_the_local_bundle(engine, faces_run, local_bundle, tmp_path, request):
    if engine == "ray":
        request.getfixturevalue("ray_local")
    build_index([faces_run.uri], str(tmp_path), OPTIONS, engine_runner(engine))
    assert_same_bundle(tmp_path, local_bundle)


def test_ray_retries_a_shard_task_that_dies(faces_run, local_bundle, tmp_path, ray_local):
    marker = tmp_path / "killed-once"
    out = tmp_path / "index"
    with kill_once("index.shard_task", marker):
        build_index([faces_run.uri], str(out), OPTIONS, engine_runner("ray"))
    assert marker.exists()  # a shard task's worker did die
    assert_same_bundle(out, local_bundle)


def test_an_images_shard_that_differs_from_its_manifest_fails_the_build(faces_run, tmp_path):
    run = tmp_path / "faces"
    shutil.copytree(faces_run.uri, run)
    part = sorted((run / "images").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes() + b"\0")
    with pytest.raises(FatalError, match=f"{part.name}: sha256 .* does not match its run manifest"):
        build_index([str(run)], str(tmp_path / "index"), OPTIONS)
    assert not list((tmp_path / "index").rglob("manifest.json"))


def test_sha_keys_are_the_first_16_hex_digits():
    import pyarrow as pa

    rng = np.random.default_rng(7)
    shas = [hashlib.sha256(rng.bytes(8)).hexdigest() for _ in range(300)]
    shas[0], shas[1] = "f" * 64, "0" * 64
    arr = pa.array(["x", *shas, "y"]).slice(1, len(shas))  # a slice: offsets that do not start at 0
    assert sha_keys(arr, "test").tolist() == [int(s[:16], 16) for s in shas]
    with pytest.raises(FatalError, match="not 64 hex digits"):
        sha_keys(pa.array(["g" * 64]), "test")


def test_the_build_core_imports_no_engine():
    """Engine adapters import the core (build.py and the rest), never the reverse."""
    engines = {"build_ray", "build_beam", "runners"}
    forbidden = ("ray", "apache_beam", "indexing.build_ray", "indexing.build_beam", "pipelines.engines")
    for path in sorted((REPO / "indexing").glob("*.py")):
        if path.stem in engines:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [("indexing." if node.level else "") + (node.module or "")]
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), (path.name, name)
