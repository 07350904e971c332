"""Index build and search on synthetic runs written in the ingest engine's exact layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from indexing import BuildOptions, IntegrityError, QueryError, build_index, open_index, synthetic
from indexing.bundle import bundle_files
from pipelines.core.errors import ConfigError

DIM = 32
SMALL = dict(flat_max=0, nlist=16, vectors_per_shard=900, recall_queries=100)


def vectors(n: int, seed: int = 3, dim: int = DIM) -> np.ndarray:
    return np.concatenate(list(synthetic.clustered(n, dim, clusters=40, seed=seed)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two runs of one model: the second repeats 500 images of the first, and some images occur twice."""
    out = tmp_path_factory.mktemp("runs")
    x = vectors(3000)
    extra = {5: [("other", "synthetic://other/5.jpg")], 2600: [("other", "synthetic://other/2600.jpg")]}
    synthetic.write_run(str(out), "run-a", iter([x[:1000], x[1000:2000]]), DIM, extra_occurrences=extra)
    synthetic.write_run(
        str(out), "run-b", iter([x[1500:2500], x[2500:]]), DIM, start=1500, extra_occurrences=extra
    )
    return out


@pytest.fixture(scope="module")
def built(runs, tmp_path_factory):
    """A PQ bundle with re-ranking, in several shards: every kind of bundle file."""
    out = tmp_path_factory.mktemp("index")
    return build_index([str(runs)], str(out), BuildOptions(max_bytes_per_vector=24, **SMALL)), out


def test_build_dedupes_and_records_occurrences(built):
    result, out = built
    m = result.manifest
    assert m["counts"] == {"input_rows": 3500, "faces": 3000, "duplicates": 500}
    assert (out / "CURRENT").read_text().strip() == result.version
    assert len(m["shards"]) == 4 and m["factory"] == "IVF16,PQ32x4fs" and m["rerank_factor"] > 1
    assert {d["name"]: d["faces"] for d in m["datasets"]} == {"other": 2, "synthetic": 3000}
    index = open_index(str(out))
    x = vectors(3000)
    hits = index.search(x[[5, 2600, 7]], k=1)
    assert [h[0].face_id for h in hits] == [
        synthetic.face_id(synthetic.image_sha(i), synthetic.MODEL_ID, 0) for i in (5, 2600, 7)
    ]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-2)
    assert {o.dataset for o in hits[0][0].occurrences} == {"synthetic", "other"}
    assert len(hits[1][0].occurrences) == 2 and len(hits[2][0].occurrences) == 1
    assert hits[2][0].bbox == (10.0, 20.0, 110.0, 140.0) and hits[2][0].image_sha256 == synthetic.image_sha(7)


def faiss_ids(path: Path) -> np.ndarray:
    import faiss  # after indexing, which sets faiss's OpenMP wait policy

    index = faiss.read_index(str(path))
    ivf = faiss.extract_index_ivf(index)
    lists = [
        faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy()
        for i in range(ivf.nlist)
        if ivf.invlists.list_size(i)
    ]
    return np.sort(np.concatenate(lists))


def test_ids_in_index_equal_ids_in_metadata(built):
    result, out = built
    folder = out / result.version
    everything = []
    for shard in result.manifest["shards"]:
        meta = pq.read_table(folder / shard["metadata"]["file"]).column("face_id").to_numpy()
        assert np.array_equal(faiss_ids(folder / shard["index"]["file"]), np.sort(meta))
        assert np.array_equal(np.load(folder / shard["ids"]["file"]), meta)  # both sorted by face_id
        everything.append(meta)
    assert len(np.unique(np.concatenate(everything))) == 3000


def bundle_names(result) -> list[str]:
    return ["manifest.json", *[e["file"] for e in bundle_files(result.manifest)]]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_any_damaged_file_is_refused_by_name(built, tmp_path, damage):
    result, out = built
    names = bundle_names(result)
    assert {Path(n).suffix for n in names} >= {".json", ".faissindex", ".parquet", ".npy"}
    for name in names:
        copy = tmp_path / name.replace("/", "_") / "index"
        shutil.copytree(out, copy)
        path = copy / result.version / name
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[: len(data) - 7]
        path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError) as caught:
            open_index(str(copy))
        assert caught.value.file == name and name in str(caught.value)


def test_on_disk_bundle_serves_memory_mapped(runs, tmp_path, built):
    result = build_index([str(runs)], str(tmp_path), BuildOptions(on_disk=True, **SMALL))
    m = result.manifest
    assert m["factory"] == "IVF16,Flat" and all(s["ivfdata"] for s in m["shards"])
    names = bundle_names(result)
    assert any(n.endswith(".ivfdata") for n in names)
    x = vectors(3000)[:200]
    ondisk = open_index(str(tmp_path)).search_ids(x, 5, nprobe=16)[1]
    in_ram = open_index(str(built[1])).search_ids(x, 5, nprobe=16)[1]
    assert (ondisk[:, 0] == in_ram[:, 0]).mean() > 0.95  # all lists probed: both exact at the top
    copy = tmp_path / "damaged"
    shutil.copytree(tmp_path, copy, ignore=shutil.ignore_patterns("damaged"))
    ivfdata = next(n for n in names if n.endswith(".ivfdata"))
    with open(copy / result.version / ivfdata, "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01\x02")
    with pytest.raises(IntegrityError, match=ivfdata):
        open_index(str(copy))


def test_built_twice_same_ids_and_results(runs, tmp_path):
    opts = BuildOptions(max_bytes_per_vector=24, **SMALL)
    a = build_index([str(runs)], str(tmp_path / "a"), opts)
    b = build_index([str(runs)], str(tmp_path / "b"), opts)
    ids = [
        np.sort(np.concatenate([np.load(r.folder + "/" + s["ids"]["file"]) for s in r.manifest["shards"]]))
        for r in (a, b)
    ]
    assert np.array_equal(*ids)
    q = vectors(300, seed=9)
    ra, rb = (open_index(r.folder).search_ids(q, 10) for r in (a, b))
    assert np.array_equal(ra[1], rb[1]) and np.allclose(ra[0], rb[0])
    assert a.manifest["nprobe"] == b.manifest["nprobe"]


def test_queries_of_wrong_dim_or_model_are_refused(built):
    index = open_index(str(built[1]))
    with pytest.raises(QueryError, match="shape"):
        index.search(np.zeros((2, DIM + 1), np.float32))
    with pytest.raises(QueryError, match="model"):
        index.search(np.zeros((2, DIM), np.float32), model_id="dlib-hog+dlib-resnet-v1")


def test_mixed_models_or_dims_are_refused(tmp_path):
    synthetic.write_run(str(tmp_path), "a", vectors(100), DIM)
    synthetic.write_run(str(tmp_path), "b", vectors(100), DIM, model_id="other-model")
    with pytest.raises(ConfigError, match="mix models"):
        build_index([str(tmp_path)], str(tmp_path / "index"))
    with pytest.raises(ConfigError, match="mix models"):
        synthetic.write_run(str(tmp_path / "d"), "c", vectors(100, dim=16), 16)
        build_index([str(tmp_path / "runs" / "a"), str(tmp_path / "d")], str(tmp_path / "index"))


def test_uncommitted_run_is_not_read(tmp_path):
    folder = Path(synthetic.write_run(str(tmp_path), "a", vectors(100), DIM))
    (folder / "_manifest.json").unlink()
    with pytest.raises(ConfigError, match="no committed run"):
        build_index([str(tmp_path)], str(tmp_path / "index"))


def test_cli_build_info_and_current(runs, tmp_path):
    from pipelines.commands.index import index_app

    cli = CliRunner()
    run_a, run_b = str(runs / "runs" / "run-a"), str(runs / "runs" / "run-b")
    args = ["build", "--runs", run_a, run_b, "--out", str(tmp_path), "--flat-max", "100000"]
    first = cli.invoke(index_app, args)
    assert first.exit_code == 0, first.output
    info = cli.invoke(index_app, ["info", str(tmp_path)])
    assert info.exit_code == 0, info.output
    assert "IDMap,Flat" in info.output and "synthetic" in info.output and "recall" in info.output
    raw = cli.invoke(index_app, ["info", str(tmp_path), "--json"])
    assert json.loads(raw.output)["counts"]["faces"] == 3000
    bad = cli.invoke(index_app, ["info", str(tmp_path / "nothing")])
    assert bad.exit_code == 1 and "CURRENT" in bad.output


def test_recall_reaches_target_at_stored_nprobe(tmp_path):
    """About 100k clustered 128-d vectors: fresh queries from the same clusters, exact ground truth."""
    x = np.concatenate(list(synthetic.clustered(101_000, 128, chunk=25_250, seed=11)))
    base, queries = x[:100_000], x[100_000:]
    synthetic.write_run(str(tmp_path), "big", iter(np.split(base, 4)), 128)
    result = build_index([str(tmp_path)], str(tmp_path / "index"), BuildOptions(max_bytes_per_vector=80))
    m = result.manifest
    assert m["factory"].startswith("IVF") and m["nprobe"] < m["plan"]["nlist"]
    import faiss

    truth = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
    index = open_index(str(tmp_path / "index"))
    found = index.search_ids(queries, 10)[1]
    keys = np.array(
        [synthetic.face_id(synthetic.image_sha(i), synthetic.MODEL_ID, 0) for i in range(100_000)]
    )
    recall = np.mean([len(np.intersect1d(f, keys[t])) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= m["recall"]["target"] == 0.95


def test_current_never_moves_back_to_an_older_version(tmp_path):
    import threading

    from indexing.bundle import CURRENT, move_current

    versions = [f"20261126T1100{i:02d}Z-{i:04x}" for i in range(12)]
    threads = [threading.Thread(target=move_current, args=(str(tmp_path), v)) for v in reversed(versions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (tmp_path / CURRENT).read_text().strip() == versions[-1]
    assert move_current(str(tmp_path), versions[0]) is False
