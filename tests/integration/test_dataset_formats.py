"""The published data set formats through ingest: MS-Celeb-1M's TSV, a Hugging Face Parquet (with
image bytes, and path-only) and Flickr metadata (CSV and JSONL, photos fetched over HTTP).

One job holds every fixture. It runs through the CLI on the local engine, killed after a few
units and resumed; Ray reads the path-only Parquet (an actor killed mid-run), Beam the TSV, the
Parquet with image bytes and the Flickr metadata; every engine must give the local rows. Every
good record is one ``images`` row with
the provenance of its format, every broken one one error row (stage ``read``) with its reason,
and no identity label of any fixture is in any output of the run or of an index built from it.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from indexing import build_index
from pipelines.core import storage
from pipelines.core.config import DatasetSpec, HttpConfig, JobConfig, RayConfig
from pipelines.core.faults import KILL_AT, KILL_ONCE
from pipelines.core.schema import ADDED_IMAGE_FIELDS, PROVENANCE_FIELDS
from pipelines.engines import beam_engine, ray_engine
from pipelines.rebuild.report import write_index_report
from tests import format_fixtures as ff
from tests.helpers import image_rows, kill_once, manifest, run_faceaudit

PER_SHARD = 3
PHOTOS = 5
BEAM_IN_PROCESS = ("--runner=DirectRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1")
LOOPBACK = ["127.0.0.0/8"]


@pytest.fixture(scope="module")
def served(faces_dir):
    """The photos (320 px JPEGs), also served over HTTP for the Flickr metadata."""
    photos = ff.small_photos(sorted(faces_dir.glob("img*.jpg"))[:PHOTOS])
    with ff.serve_files({f"{i}.jpg": p for i, p in enumerate(photos)}) as base:
        yield photos, base


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, served) -> dict[str, ff.Fixture]:
    photos, base = served
    root = tmp_path_factory.mktemp("formats")
    for name in ("ms", "hf", "hfpath", "flcsv", "fljsonl"):
        (root / name).mkdir()
    return {
        "ms": ff.msceleb_tsv(root / "ms", photos),
        "hf": ff.hf_parquet(root / "hf", photos),
        "hfpath": ff.hf_parquet(root / "hfpath", photos, path_only=True),
        "flcsv": ff.flickr_meta(root / "flcsv", base, PHOTOS - 1, "csv"),
        "fljsonl": ff.flickr_meta(root / "fljsonl", base, PHOTOS - 1, "jsonl"),
    }


FORMATS = {
    "ms": "msceleb-tsv",
    "hf": "auto",
    "hfpath": "hf-parquet",
    "flcsv": "auto",
    "fljsonl": "flickr-meta",
}


def specs(fixtures, names) -> list[DatasetSpec]:
    """The data sets, some with their format named and some left to ``auto``."""
    return [DatasetSpec(name=n, source=str(fixtures[n].source), format=FORMATS[n]) for n in names]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, fixtures) -> Path:
    """The job through the CLI (a registry of YAML entries), killed after its 5th unit's faces
    shard, then run again to its end."""
    root = tmp_path_factory.mktemp("formats-local")
    registry = root / "registry"
    registry.mkdir()
    for spec in specs(fixtures, fixtures):
        entry = spec.model_dump(include={"name", "source", "format"})
        (registry / f"{spec.name}.yaml").write_text(yaml.safe_dump(entry))
    job = {
        "datasets": list(fixtures),
        "registry": str(registry),
        "out": str(root / "out"),
        "images_per_shard": PER_SHARD,
        "http": {"allow_networks": LOOPBACK},
        "run_id": "r",
        "workers": 1,
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    args = ["ingest", "--config", root / "job.yaml", "--no-progress"]
    marker = root / "killed-once"
    killed = run_faceaudit(args, env={KILL_AT: "unit.after_faces_shard:5", KILL_ONCE: str(marker)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_faceaudit(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root / "out" / "runs" / "r"


def job(out: Path, fixtures, names, per_shard: int = PER_SHARD) -> JobConfig:
    """One worker and one Ray actor: 5 distinct photos need no more, and each loads the models."""
    return JobConfig(
        datasets=specs(fixtures, names),
        out=str(out),
        run_id="r",
        images_per_shard=per_shard,
        progress=False,
        http=HttpConfig(allow_networks=LOOPBACK),
        workers=1,
        ray=RayConfig(actors=1),
    )


def rows_of(run: Path, names) -> list[dict]:
    return [r for r in image_rows(run) if r["dataset"] in names]


def test_every_record_is_one_row_with_its_provenance_or_its_reason(local_run, fixtures):
    rows = image_rows(local_run)
    by_uri = {r["source_uri"]: r for r in rows}
    assert len(by_uri) == len(rows)  # each record once, after the kill too
    expected = {uri for f in fixtures.values() for uri in [*f.good, *f.broken]}
    assert set(by_uri) == expected
    for f in fixtures.values():
        for uri, provenance in f.good.items():
            row = by_uri[uri]
            assert row["status"] in ("ok", "no_face"), (uri, row["error"])
            assert {k: row[k] for k in PROVENANCE_FIELDS if row[k] is not None} == provenance
        for uri, reason in f.broken.items():
            row = by_uri[uri]
            assert (row["status"], row["error_stage"]) == ("error", "read"), uri
            assert reason in row["error"], (uri, row["error"])
    # the same photo in every data set: one image, every occurrence with its own provenance
    assert len({r["image_sha256"] for r in rows if r["status"] != "error"}) == PHOTOS
    assert sum(r["n_faces"] for r in rows if r["status"] == "ok") > 0


def _values(path: Path) -> str:
    """Every value a file holds, as text: a Parquet file's rows, any other file's bytes."""
    if path.suffix == ".parquet":
        return json.dumps(pq.read_table(path).to_pylist(), default=str)
    return path.read_bytes().decode("latin-1")


def test_no_identity_label_reaches_a_run_or_its_index(local_run, fixtures, tmp_path):
    index = tmp_path / "index"
    built = build_index([str(local_run)], str(index))
    write_index_report(str(index), built.manifest)  # as `faceaudit index build` does
    files = [p for folder in (local_run, index) for p in folder.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"_manifest.json", "report.json", "report.html", "manifest.json"} <= names
    assert sum(p.suffix == ".parquet" for p in files) > 10
    labels = {label.lower() for f in fixtures.values() for label in f.labels}
    leaks = {
        (str(p.relative_to(p.parents[2])), label)
        for p in files
        for label in labels
        if label in _values(p).lower()
    }
    assert not leaks


def test_ray_reads_the_path_only_parquet_like_the_local_engine(tmp_path, fixtures, local_run, ray_local):
    """Units of a whole row group each (2 units: Ray's cost is per unit, the rows do not change)."""
    names = ("hfpath",)
    with kill_once("analyze.batch", tmp_path / "killed-once"):
        run = Path(ray_engine.run_job(job(tmp_path, fixtures, names, per_shard=8)).uri)
    assert (tmp_path / "killed-once").exists()  # an actor did die
    assert rows_of(run, names) == rows_of(local_run, names)


def test_beam_reads_the_tsv_parquet_and_flickr_data_sets_like_the_local_engine(tmp_path, fixtures, local_run):
    names = ("ms", "hf", "flcsv", "fljsonl")
    run = Path(beam_engine.run_job(job(tmp_path, fixtures, names), list(BEAM_IN_PROCESS)).uri)
    assert rows_of(run, names) == rows_of(local_run, names)


@pytest.mark.parametrize("every", [1, 2], ids=["all-old", "half-old"])
def test_a_run_written_before_the_provenance_columns_still_builds_an_index(local_run, tmp_path, every):
    """The run with its ``images`` shards rewritten in the first, 10-column schema: all of them,
    or every other one (a run begun before the columns existed and resumed after)."""
    old = tmp_path / "old"
    shutil.copytree(local_run, old)
    body = manifest(old)
    images = [shard for shard in body["shards"] if shard["table"] == "images"]
    for shard in images[::every]:
        path = old / shard["file"]
        pq.write_table(pq.read_table(path).drop(list(ADDED_IMAGE_FIELDS)), path, compression="zstd")
        shard["sha256"] = storage.sha256_file(str(path))
    (old / "_manifest.json").write_text(json.dumps(body))
    widths = sorted({len(pq.read_schema(p)) for p in (old / "images").glob("*.parquet")})
    assert widths == ([10] if every == 1 else [10, 10 + len(ADDED_IMAGE_FIELDS)])

    result = build_index([str(old)], str(tmp_path / "index"))
    fresh = build_index([str(local_run)], str(tmp_path / "fresh"))

    def vectors(built) -> int:
        return sum(shard["ntotal"] for shard in built.manifest["shards"])

    assert vectors(result) == vectors(fresh) > 0


def test_a_file_not_of_its_declared_format_fails_the_job(tmp_path, fixtures):
    """Plan-time checks of each pairing are test_readers.py's; here the job's loud end."""
    entry = {"name": "a", "source": str(fixtures["ms"].source), "format": "hf-parquet"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"datasets": [entry], "out": str(tmp_path / "out")}))
    proc = run_faceaudit(["ingest", "--config", tmp_path / "job.yaml", "--no-progress"])
    assert proc.returncode != 0
    assert "is not hf-parquet: not a Parquet file" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("_manifest.json"))
