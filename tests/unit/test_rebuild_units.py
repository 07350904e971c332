"""Pure helpers of ``faceaudit rebuild``: the delta plan, version retention, re-shard split points,
shard names, fingerprints, the local lock and the SVG charts."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from indexing import prune as gc
from indexing.export import split_points
from indexing.extend import Decision, decide, shard_dataset
from indexing.params import choose_plan
from pipelines.core.config import DatasetSpec
from pipelines.core.locks import LOCK_NAME, LockHeld, read_lock
from pipelines.core.locks import ExpiringLock as RebuildLock
from pipelines.rebuild import svg
from pipelines.rebuild.fingerprint import fingerprint
from pipelines.rebuild.plan import Source, current_sources, live_pairs, plan_delta, record_sources


def spec(name: str, version: str = "1", removed: bool = False) -> DatasetSpec:
    return DatasetSpec(name=name, source=f"/data/{name}", version=version, removed=removed)


# ---------------------------------------------------------------- plan


def test_plan_sorts_every_data_set():
    current = {
        "same": Source("same", "1", "1:aa", ("r1",)),
        "bumped": Source("bumped", "1", "1:bb", ("r1",)),
        "relisted": Source("relisted", "1", "1:cc", ("r1",)),
        "flagged": Source("flagged", "1", "1:dd", ("r1",)),
        "deleted": Source("deleted", "1", "1:ee", ("r2",)),
        "legacy": Source("legacy", "1", None, ("r2",)),
    }
    registry = {
        s.name: s
        for s in [
            spec("same"),
            spec("bumped", "2"),
            spec("relisted"),
            spec("flagged", removed=True),
            spec("legacy"),
            spec("fresh"),
            spec("gone-before", removed=True),
        ]
    }
    prints = {"same": "1:aa", "bumped": "2:bb", "relisted": "1:zz", "legacy": "1:ff", "fresh": "1:00"}
    delta = plan_delta(registry, prints, current)
    assert [s.name for s in delta.ingest] == ["bumped", "fresh", "legacy", "relisted"]
    assert list(delta.keep) == ["same"] and delta.keep["same"].runs == ("r1",)
    assert delta.removed == ["flagged", "deleted"]
    assert (
        delta.reasons["bumped"] == "version '1' -> '2'"
        and delta.reasons["relisted"] == "source listing changed"
    )
    assert delta.reasons["deleted"] == "its registry file is gone" and "gone-before" not in delta.reasons
    assert not delta.empty


def test_plan_of_an_unchanged_registry_is_empty():
    current = {"a": Source("a", "1", "1:aa", ("r1",))}
    assert plan_delta({"a": spec("a")}, {"a": "1:aa"}, current).empty
    assert not plan_delta({"a": spec("a")}, {"a": "1:aa"}, {}).empty  # first build: everything is new


def test_sources_round_trip_and_live_pairs():
    sources = {"a": Source("a", "1", "1:aa", ("r1", "r2")), "b": Source("b", "2", "2:bb", ("r2",))}
    manifest = {"rebuild": {"sources": record_sources(sources)}}
    assert current_sources(manifest) == sources
    assert live_pairs(sources) == {"r1": {"a"}, "r2": {"a", "b"}}
    plain = {"runs": [{"run_id": "r9"}], "datasets": [{"name": "x", "version": "3"}]}
    assert current_sources(plain) == {"x": Source("x", "3", None, ("r9",))}
    assert current_sources(None) == {}


# ---------------------------------------------------------------- retention


def name(minute: int) -> str:
    return f"20260101T00{minute:02d}00Z-0000000{minute % 10}"


NOW = dt.datetime(2026, 1, 1, 2, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("keep", [1, 2, 3, 5])
@pytest.mark.parametrize("length", [1, 3, 6])
def test_retention_keeps_the_history_of_current(keep, length):
    chain = [name(m) for m in range(length)]
    versions = {v: gc.Version(True, chain[i - 1] if i else None) for i, v in enumerate(chain)}
    versions[name(30)] = gc.Version(False)  # a crashed build, long ago
    versions[name(59)] = gc.Version(True, chain[-1])  # a killed rebuild's version, never CURRENT
    kept, deleted = gc.choose(versions, chain[-1], keep, NOW, grace_s=600)
    assert kept == sorted(chain[-keep:])
    assert chain[-1] in kept
    assert sorted(deleted) == sorted(set(versions) - set(kept))


def test_retention_spares_recent_orphans_and_follows_the_chain_not_the_names():
    a, b, c, d = name(1), name(2), name(3), name(4)
    # c was a killed rebuild (never CURRENT); d was rebuilt from b
    versions = {a: gc.Version(True), b: gc.Version(True, a), c: gc.Version(True, b), d: gc.Version(True, b)}
    kept, deleted = gc.choose(versions, d, 2, NOW, grace_s=600)
    assert kept == [b, d] and deleted == [a, c]
    fresh = {**versions, name(58): gc.Version(False)}
    _, deleted = gc.choose(fresh, d, 2, dt.datetime(2026, 1, 1, 0, 59, tzinfo=dt.timezone.utc), grace_s=600)
    assert name(58) not in deleted  # may still be building
    assert gc.choose(versions, None, 1, NOW, 600)[1] == []  # no CURRENT: nothing committed goes


# ---------------------------------------------------------------- re-shard split points


def test_split_points_cover_every_id_once_in_near_equal_parts():
    rng = np.random.default_rng(0)
    for n, shards in itertools.product(range(1, 60), range(1, 9)):
        if shards > n:
            continue
        ids = np.sort(rng.choice(10_000, size=n, replace=False)).astype(np.int64)
        ranges = split_points(ids, shards)
        counts = [int(((ids >= lo) & (ids < hi)).sum()) for lo, hi in ranges]
        assert sum(counts) == n and min(counts) >= 1 and max(counts) - min(counts) <= 1
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))


# ---------------------------------------------------------------- extend or retrain


def test_decide():
    plan = choose_plan(50_000, 128, flat_max=20_000)
    base = {
        "model_id": "m",
        "plan": {"kind": plan.kind, "pq_m": 0, "pq_bits": 0, "opq": False, "rerank": False},
        "factory": plan.factory,
        "counts": {"faces": 30_000},
        "rebuild": {"trained_for": 30_000},
    }
    from indexing.extend import VersionOptions

    opts = VersionOptions()
    assert decide(base, plan, "m", 50_000, opts).mode == "extend"
    assert "2x" in decide(base, plan, "m", 60_001, opts).reason
    assert decide(base, plan, "other", 50_000, opts) == Decision("retrain", "the previous version holds 'm'")
    assert decide(None, plan, "m", 50_000, opts).mode == "retrain"
    assert (
        decide(base, choose_plan(50_000, 128, max_bytes_per_vector=80), "m", 50_000, opts).mode == "retrain"
    )


def test_shard_dataset_names():
    assert shard_dataset("/x/images/part-my-set-000003.parquet") == "my-set"
    assert shard_dataset("gs://b/r/images/part-a-1-0000012.parquet") == "a-1"
    assert shard_dataset("/x/images/notes.txt") is None


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_follows_version_and_listing(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff" + b"a" * 10)
    one = DatasetSpec(name="x", source=str(folder), version="1")
    first = fingerprint(one)
    assert first.startswith("1:") and fingerprint(one) == first
    assert fingerprint(one.model_copy(update={"version": "2"})).split(":")[1] == first.split(":")[1]
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"b" * 10)
    second = fingerprint(one)
    assert second != first
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"b" * 11)  # same name, new size
    assert fingerprint(one) != second


# ---------------------------------------------------------------- the local lock


def test_local_lock_is_exclusive_and_released(tmp_path):
    index = str(tmp_path / "index")
    with RebuildLock(index, ttl_s=60) as held:
        assert read_lock(index).nonce == held.info.nonce
        with pytest.raises(LockHeld, match=rf"a rebuild is in progress \(held by .*:{os.getpid()} since"):
            RebuildLock(index, ttl_s=60).acquire()
    assert read_lock(index) is None


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    index = tmp_path / "index"
    code = (
        "import sys; from pipelines.core.locks import ExpiringLock as RebuildLock; "
        "RebuildLock(sys.argv[1], ttl_s=3600, renew=False).acquire()"
    )  # exits without releasing
    subprocess.run([sys.executable, "-c", code, str(index)], check=True)
    dead = json.loads((index / LOCK_NAME).read_text())
    taker = RebuildLock(str(index), ttl_s=60, renew=False)
    taker.acquire()
    assert taker.took_over.pid == dead["pid"]
    taker.release()


def test_a_renewing_holder_keeps_its_lock(tmp_path, monkeypatch):
    from pipelines.core import locks

    now = [dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)]
    monkeypatch.setattr(locks, "now_utc", lambda: now[0])  # the lock's clock, moved by the test
    index = str(tmp_path / "index")
    lock = RebuildLock(index, ttl_s=60, renew=False)
    lock.acquire()
    before = lock.info.expires_at
    now[0] += dt.timedelta(seconds=45)
    lock.refresh()
    assert dt.datetime.fromisoformat(lock.info.expires_at) == now[0] + dt.timedelta(seconds=60)
    assert read_lock(index).expires_at == lock.info.expires_at > before and not lock.lost
    now[0] += dt.timedelta(seconds=30)  # past the expiry it was taken with, not the renewed one
    with pytest.raises(LockHeld):
        RebuildLock(index, ttl_s=60, renew=False).acquire()
    lock.check()
    lock.release()


# ---------------------------------------------------------------- charts


@pytest.mark.parametrize(
    "chart",
    [
        svg.grouped_bars("a & b", ["x<y", "z"], {"images": [3, 0], "faces": [1, 2]}),
        svg.grouped_bars("empty", [], {}),
        svg.histogram("scores", [0.0, 0.5, 1.0], [2, 5]),
        svg.lines(
            "recall", {"r": [(1, 0.5), (4, 0.9), (16, 1.0)]}, "nprobe", "recall", y_max=1.0, log_x=True
        ),
        svg.lines("one point", {"r": [(1, 1.0)]}, "x", "y"),
    ],
)
def test_charts_are_well_formed_svg(chart):
    root = ET.fromstring(chart)
    assert root.tag.endswith("svg") and root.find("{http://www.w3.org/2000/svg}title") is not None
