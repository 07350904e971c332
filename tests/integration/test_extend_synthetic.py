"""``indexing.extend.build_version`` on synthetic runs (clustered vectors with exact ground truth):
extend while the collection fits, retrain past the growth factor or when recall falls short, and
drop the faces of data sets that left the scope."""

from __future__ import annotations

import numpy as np
import pytest

from indexing import open_index
from indexing import runs as runsmod
from indexing.extend import VersionOptions, build_version, write_manifest
from indexing.options import BuildOptions
from indexing.synthetic import clustered, write_run

DIM = 32


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    vectors = np.concatenate(list(clustered(9000, DIM, clusters=50, seed=1)))
    write_run(out, "r1", vectors[:4000], DIM, start=0, dataset="s1")
    write_run(out, "r2", vectors[4000:5000], DIM, start=4000, dataset="s2")
    write_run(out, "r3", vectors[5000:], DIM, start=5000, dataset="s3")
    return {r: runsmod.load_run(f"{out}/runs/{r}") for r in ("r1", "r2", "r3")}


def options(**kw) -> VersionOptions:
    build = {"flat_max": 0, "recall_queries": 200, "target_recall": 0.9, **kw}
    return VersionOptions(BuildOptions(**build))


def publish(out, result) -> dict:
    write_manifest(out, result.version, result.manifest)
    return result.manifest


def test_extend_then_retrain_past_the_growth_factor(tmp_path, runs):
    out = str(tmp_path / "index")
    first = build_version([runs["r1"]], {"r1": {"s1"}}, out, options())
    assert first.decision.mode == "retrain" and first.manifest["factory"].startswith("IVF")
    base = publish(out, first)
    second = build_version(
        [runs["r1"], runs["r2"]], {"r1": {"s1"}, "r2": {"s2"}}, out, options(), base, first.folder
    )
    assert second.decision.mode == "extend", second.decision.reason
    assert second.manifest["counts"]["faces"] == 5000 and second.manifest["recall"]["at_10"] >= 0.9
    assert second.manifest["factory"] == base["factory"]  # the same trained index, extended
    assert second.manifest["rebuild"]["trained_for"] == 4000
    base2 = publish(out, second)
    third = build_version(
        list(runs.values()), {"r1": {"s1"}, "r2": {"s2"}, "r3": {"s3"}}, out, options(), base2, second.folder
    )
    assert third.decision.mode == "retrain" and "2x" in third.decision.reason  # 9000 > 2 x 4000


def test_retrain_when_the_extended_index_misses_the_target(tmp_path, runs):
    out = str(tmp_path / "index")
    tight = {"max_bytes_per_vector": 16, "target_recall": 0.999, "rerank": False}  # PQ codes: recall < 1
    first = build_version([runs["r1"]], {"r1": {"s1"}}, out, options(**tight))
    base = publish(out, first)
    second = build_version(
        [runs["r1"], runs["r2"]], {"r1": {"s1"}, "r2": {"s2"}}, out, options(**tight), base, first.folder
    )
    assert [a["mode"] for a in second.attempts] == ["extend", "retrain"]
    assert second.decision.mode == "retrain" and "below the target" in second.decision.reason


def test_a_data_set_out_of_scope_loses_its_faces(tmp_path, runs):
    out = str(tmp_path / "index")
    result = build_version([runs["r1"], runs["r2"]], {"r2": {"s2"}}, out, options(flat_max=20_000))
    publish(out, result)
    assert result.manifest["counts"]["faces"] == 1000
    assert [d["name"] for d in result.manifest["datasets"]] == ["s2"]
    assert [r["run_id"] for r in result.manifest["runs"]] == ["r2"]  # r1 gives nothing any more
    index = open_index(result.folder)
    try:
        hits = index.search(np.concatenate(list(clustered(5, DIM, clusters=50, seed=1))), k=3)
        assert {o.dataset for row in hits for h in row for o in h.occurrences} == {"s2"}
    finally:
        index.close()
