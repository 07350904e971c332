"""The catalogue in a rebuild and in ``faceaudit datasets list`` (real dlib models, small copies of
the shared photos, as tests/integration/test_rebuild.py does).

A catalogue of a withdrawn data set without a source, a withdrawn one whose publisher's address
still answers, and one available, under an operator's registry: the rebuild fetches none of the
first two and says so; once the operator gives the withdrawn one a source of their own (a folder
of copies), it is ingested, and ``datasets list --index`` shows it covered, on local disk and on GCS.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.core import storage
from pipelines.rebuild.config import RebuildConfig
from pipelines.rebuild.driver import rebuild
from tests.format_fixtures import msceleb_tsv
from tests.helpers import REPO, read_table, rebuild_config, write_small_copies

CATALOG = REPO / "configs" / "datasets" / "catalog"


@pytest.fixture(scope="module")
def pool(tmp_path_factory, faces_dir) -> list[Path]:
    """7 distinct shared photos, at most 240 px (fast to embed)."""
    folder = tmp_path_factory.mktemp("pool")
    write_small_copies(sorted(faces_dir.glob("img*.jpg"))[:7], folder, 240)
    return sorted(folder.iterdir())


def photos(folder: Path, files: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, folder / f.name)
    return folder


def entry(folder: Path, **spec) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))


def config(root: Path) -> RebuildConfig:
    # the catalogue first, the operator's registry last
    return rebuild_config(root, registry=f"{root / 'catalog'},{root / 'ops'}")


@pytest.fixture(scope="module")
def audited(tmp_path_factory, pool):
    """Two rebuilds of one root: without, then with the operator's copy of ms-celeb-1m."""
    root = tmp_path_factory.mktemp("catalog")
    (root / "catalog").mkdir()
    shutil.copy(CATALOG / "ms-celeb-1m.yaml", root / "catalog")  # the real entry: withdrawn, no source
    pulled = photos(root / "publisher" / "pulled", pool[5:7])  # still answers, but withdrawn
    entry(root / "catalog", name="pulled", source=str(pulled), status="withdrawn", description="taken down")
    entry(root / "catalog", name="listed", source=None, status="available", description="no public copy")
    entry(root / "ops", name="alpha", version="1", source=str(photos(root / "data" / "alpha", pool[0:2])))
    return root


def test_a_rebuild_skips_what_it_must_not_fetch_and_says_why(audited, caplog):
    caplog.set_level(logging.WARNING, logger="pipelines.rebuild.driver")
    state = rebuild(config(audited))
    assert state.status == "published" and state.analyzed == 2
    assert [s.name for s in state.delta.ingest] == ["alpha"]
    assert set(state.skipped) == {"ms-celeb-1m", "pulled", "listed"}
    messages = {r.getMessage() for r in caplog.records}
    ms = next(m for m in messages if "'ms-celeb-1m' skipped" in m)
    assert "skipped: status withdrawn, no source (the publisher no longer serves it)." in ms
    assert "a source of your own in your registry" in ms
    pulled = next(m for m in messages if "'pulled' skipped" in m)
    assert "status withdrawn in the catalogue" in pulled and "is not fetched" in pulled
    assert any("'listed' skipped: no source (no public copy)" in m for m in messages)
    # nothing of theirs was read: the run lists alpha's images only
    assert {r["dataset"] for r in read_table(state.run_uri, "images").to_pylist()} == {"alpha"}
    report = json.loads((Path(state.report_uri).parent / "report.json").read_text())
    assert report["delta"]["reasons"]["ms-celeb-1m"].startswith("skipped: status withdrawn, no source")
    assert report["delta"]["reasons"]["pulled"].startswith("skipped: status withdrawn")


def test_an_operator_copy_of_a_withdrawn_data_set_is_ingested(audited, pool, caplog):
    caplog.set_level(logging.WARNING, logger="pipelines.rebuild.driver")
    ours = yaml.safe_load((CATALOG / "ms-celeb-1m.yaml").read_text())
    # a copy we hold, in the published layout: the TSV of face crops and its MID -> name file
    held = audited / "copies" / "ms-celeb-1m"
    held.mkdir(parents=True)
    msceleb_tsv(held, [f.read_bytes() for f in pool[2:5]], broken=False)
    ours["source"] = str(held)
    entry(audited / "ops", **ours)  # same name, status withdrawn, a source of its own
    state = rebuild(config(audited))
    assert state.status == "published" and state.analyzed == 3
    assert [s.name for s in state.delta.ingest] == ["ms-celeb-1m"]
    assert set(state.skipped) == {"pulled", "listed"}
    assert not any("'ms-celeb-1m' skipped" in r.getMessage() for r in caplog.records)
    held = {d["name"]: d for d in state.version.manifest["datasets"]}
    assert set(held) == {"alpha", "ms-celeb-1m"} and held["ms-celeb-1m"]["images"] == 3


def list_json(*args: str) -> dict:
    result = CliRunner().invoke(app, ["datasets", "list", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check_listing(body: dict, index_version: str) -> None:
    rows = {d["name"]: d for d in body["datasets"]}
    assert body["index_version"] == index_version
    assert set(rows) == {"alpha", "ms-celeb-1m", "pulled", "listed"}
    ms = rows["ms-celeb-1m"]
    assert ms["covered"] and ms["same_version"] and ms["status"] == "withdrawn"
    assert ms["indexed"]["images"] == 3 and ms["indexed"]["faces"] >= 3 and ms["format"] == "msceleb-tsv"
    assert ms["indexed"]["fingerprint"].startswith("2016:")
    assert rows["alpha"]["covered"] and rows["alpha"]["indexed"]["images"] == 2
    assert not rows["pulled"]["covered"] and rows["pulled"]["indexed"] is None
    assert not rows["listed"]["covered"] and rows["listed"]["source"] is None


def test_datasets_list_on_local_disk(audited):
    version = (audited / "index" / "CURRENT").read_text().strip()
    registries = ["--registry", str(audited / "catalog"), "--registry", str(audited / "ops")]
    body = list_json(*registries, "--index", str(audited / "index"))
    check_listing(body, version)
    # comma-separated is the same; without --index nothing is covered or not
    layers = f"{audited / 'catalog'},{audited / 'ops'}"
    commas = list_json("--registry", layers, "--index", str(audited / "index"))
    assert commas["datasets"] == body["datasets"]
    bare = list_json(*registries)
    assert bare["index"] is None and all(d["covered"] is None for d in bare["datasets"])
    table = CliRunner().invoke(app, ["datasets", "list", *registries, "--index", str(audited / "index")])
    assert table.exit_code == 0, table.output
    for text in ("ms-celeb-1m", "withdrawn", "msceleb-tsv", "the index covers 2 of them", version):
        assert text in table.stdout
    # an index data set that no registry describes is listed as such
    only_ops = list_json("--registry", str(audited / "ops"), "--index", str(audited / "index"))
    rows = {d["name"]: d for d in only_ops["datasets"]}
    assert rows["ms-celeb-1m"]["in_registry"] and not rows.get("pulled")
    missing = CliRunner().invoke(app, ["datasets", "list", "--registry", str(audited / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_datasets_list_of_the_shipped_catalogue():
    body = list_json("--registry", str(CATALOG), "--registry", str(REPO / "configs" / "datasets"))
    names = {d["name"] for d in body["datasets"]}
    assert {"ms-celeb-1m", "megaface", "lfw", "deepface-tests"} <= names and len(names) >= 21


def test_datasets_list_on_gcs(audited, gcs_emulator):
    bucket = gcs_emulator.make_bucket(f"catalog-{time.time_ns()}")
    runner = CliRunner()
    index = storage.join(bucket, "index")
    exported = runner.invoke(app, ["export", "--index", str(audited / "index"), "--to", index])
    assert exported.exit_code == 0, exported.output
    for layer in ("catalog", "ops"):
        for path in sorted((audited / layer).glob("*.yaml")):
            storage.write_atomic(storage.join(bucket, "registry", layer, path.name), path.read_bytes())
    version = storage.read_text(storage.join(index, "CURRENT")).strip()
    body = list_json(
        "--registry",
        storage.join(bucket, "registry", "catalog"),
        "--registry",
        storage.join(bucket, "registry", "ops"),
        "--index",
        index,
    )
    check_listing(body, version)
