"""The pure helpers of the index build: plan choice, recall arithmetic, the sealed manifest."""

from __future__ import annotations

import numpy as np
import pytest

from indexing import bundle
from indexing.errors import IntegrityError
from indexing.params import ID_BYTES, choose_plan, code_bytes, nlist_for, pq_m_for
from indexing.recall import drop_self, merge_topk, recall_at, rerank_factors, tune_nprobe_and_depth
from pipelines.core.errors import ConfigError


@pytest.mark.parametrize("n", [*range(1, 300), *np.unique(np.logspace(2.5, 9, 300).astype(int))])
def test_nlist_is_a_trainable_power_of_two(n):
    nlist = nlist_for(int(n))
    assert nlist >= 1 and nlist & (nlist - 1) == 0
    assert nlist == 1 or nlist * 39 <= n
    assert nlist <= 2 * 4 * np.sqrt(n)


@pytest.mark.parametrize("dim", [32, 64, 96, 128, 256, 384, 512, 768])
@pytest.mark.parametrize("budget", [10, 16, 24, 40, 72, 80, 136, 200, 1000])
@pytest.mark.parametrize("bits", [4, 8])
def test_pq_m_divides_dim_and_fits_budget(dim, budget, bits):
    m = pq_m_for(dim, budget, bits)
    assert dim % m == 0
    assert code_bytes(m, bits) + ID_BYTES <= budget
    if bits == 4:
        assert m % 2 == 0
    # no larger valid m would have fitted
    bigger = [x for x in range(m + 1, dim + 1) if dim % x == 0 and code_bytes(x, bits) + ID_BYTES <= budget]
    assert bits == 8 or not [x for x in bigger if x % 2 == 0]


def test_pq_budget_too_small_is_a_clear_error():
    with pytest.raises(ConfigError, match="max-bytes-per-vector"):
        pq_m_for(128, ID_BYTES, 8)


def test_plan_follows_size_and_budget():
    assert choose_plan(1000, 128).kind == "flat"
    assert choose_plan(1000, 128, max_bytes_per_vector=4 * 128 + 8).kind == "flat"
    assert choose_plan(100_000, 128).factory == "IVF1024,Flat"
    pq = choose_plan(1_000_000, 128, max_bytes_per_vector=80)
    assert pq.factory == "IVF4096,PQ128x4fs" and pq.bytes_per_vector == 72 and pq.rerank
    disk = choose_plan(1_000_000, 128, max_bytes_per_vector=80, on_disk=True)
    assert disk.factory == "IVF4096,PQ32x8" and disk.train_size >= 256 * 39
    assert choose_plan(50, 128, on_disk=True).kind == "ivf_flat"
    assert choose_plan(1_000_000, 512, max_bytes_per_vector=80, opq=True).factory.startswith("OPQ128_512,")


def test_merge_topk_and_recall():
    s, i = merge_topk(
        [np.array([[0.9, 0.1]]), np.array([[0.5, 0.95]])], [np.array([[1, 2]]), np.array([[3, -1]])], 3
    )
    assert i.tolist() == [[1, 3, 2]]  # the -1 pad never wins, even with a high score
    assert recall_at(np.array([[1, 2, 3]]), np.array([[3, 1, 9]]), 3) == pytest.approx(2 / 3)
    assert drop_self(np.array([[7, 1, 2], [1, 2, 3]]), np.array([7, 9]), 2).tolist() == [[1, 2], [1, 2]]


def test_manifest_seal_catches_any_change():
    body = {"format": bundle.FORMAT, "shards": [], "nprobe": 8}
    raw = bundle.seal(body)
    assert bundle.parse_manifest(raw) == body
    changed = raw.replace(b'"nprobe": 8', b'"nprobe": 9')
    with pytest.raises(IntegrityError, match="manifest.json"):
        bundle.parse_manifest(changed)
    with pytest.raises(IntegrityError, match="manifest.json"):
        bundle.parse_manifest(raw[: len(raw) // 2])


def test_occurrences_fall_back_to_the_faces_row():
    import pyarrow as pa

    from indexing.occurrences import occurrence_lists

    meta = pa.table(
        {"image_sha256": ["b", "a", "c"], "dataset": ["d1", "d1", "d2"], "source_uri": ["u-b", "u-a", "u-c"]}
    )
    found = pa.table(
        {"image_sha256": ["a", "a", "b"], "dataset": ["d1", "d3", "d1"], "source_uri": ["u-a", "x", "u-b"]}
    )
    assert occurrence_lists(meta, found).to_pylist() == [
        [{"dataset": "d1", "source_uri": "u-b"}],
        [{"dataset": "d1", "source_uri": "u-a"}, {"dataset": "d3", "source_uri": "x"}],
        [{"dataset": "d2", "source_uri": "u-c"}],  # "c" is in no images table: its own row
    ]
    assert occurrence_lists(meta.slice(0, 2), found).to_pylist()[1][1]["dataset"] == "d3"


@pytest.mark.parametrize("first,largest", [(1, 1), (10, 80), (10, 10), (10, 100), (3, 7), (40, 20)])
def test_rerank_factors_double_up_to_the_largest(first, largest):
    factors = rerank_factors(first, largest)
    assert factors[0] == first
    assert factors[-1] == max(first, largest)
    assert all(b == 2 * a for a, b in zip(factors[:-2], factors[1:-1], strict=True))
    assert factors == sorted(set(factors))


def _depth_search(truth: np.ndarray, found_share):
    """A search whose recall@10 is found_share(nprobe, factor): that many true ids, then misses."""

    def search(x, k, nprobe, factor):
        keep = int(round(10 * found_share(nprobe, factor)))
        out = np.full((len(x), k), -1, dtype=np.int64)
        out[:, 0] = np.arange(len(x))  # each query's own id, dropped by the measurement
        out[:, 1 : 1 + keep] = truth[:, :keep]
        return out

    return search


def test_rerank_depth_grows_only_until_every_list_reaches_the_target():
    n, nlist = 50, 64
    truth = np.arange(1000, 1000 + n * 10).reshape(n, 10)
    self_ids = np.arange(n)
    # recall rises with nprobe up to a ceiling set by the re-rank depth: 0.8 at x10, 0.9 at x20, 1.0 at x40
    ceiling = {10: 0.8, 20: 0.9, 40: 1.0, 80: 1.0}
    search = _depth_search(truth, lambda p, f: min(ceiling[f], p / 8))
    report = tune_nprobe_and_depth(search, np.zeros((n, 4)), self_ids, truth, nlist, 0.95, [10, 20, 40, 80])
    assert report.rerank_factor == 40 and report.nprobe == 8 and report.recall_at_10 == 1.0
    assert [t["rerank_factor"] for t in report.tried[:2]] == [10, 20]  # one full-probe check each
    # a target no depth reaches: the last factor is tuned anyway and reported as missed
    search = _depth_search(truth, lambda p, f: min(0.5, p / 8))
    report = tune_nprobe_and_depth(search, np.zeros((n, 4)), self_ids, truth, nlist, 0.95, [10, 20])
    assert report.rerank_factor == 20 and report.nprobe == nlist and report.recall_at_10 == 0.5
