"""The owner rule of the distributed engines, on small made-up plans with known answers."""

from __future__ import annotations

import itertools
import random

from pipelines.core.dedup import (
    PlannedUnit,
    duplicates,
    order_of,
    ordinal_of,
    position_of,
    unit_tasks,
)
from pipelines.core.records import WorkUnit


def test_order_packs_unit_then_position_and_sorts_like_the_pair():
    pairs = [(u, p) for u in (0, 1, 7, 2**20) for p in (0, 1, 255, 2**32 - 1)]
    for unit, position in pairs:
        order = order_of(unit, position)
        assert (ordinal_of(order), position_of(order)) == (unit, position)
        assert order < 2**63
    assert sorted(pairs) == sorted(pairs, key=lambda p: order_of(*p))


def test_the_owner_is_the_least_order_whatever_the_arrival_order():
    orders = [order_of(3, 1), order_of(0, 9), order_of(0, 2), order_of(5, 0)]
    for arrival in itertools.permutations(orders):
        found = duplicates(arrival)
        assert {d.owner for d in found} == {order_of(0, 2)}
        assert sorted(d.order for d in found) == sorted(set(orders) - {order_of(0, 2)})
    assert duplicates([order_of(4, 4)]) == []


def _plan(units: int, done: set[int] = frozenset()) -> list[PlannedUnit]:
    return [PlannedUnit(WorkUnit("d", "/src", "folder", i, ()), i, i in done) for i in range(units)]


def test_tasks_know_their_duplicates_and_what_later_units_wait_for():
    # image A: (0,1) owns, (0,3) same unit, (2,0) another unit; image B: owner in done unit 1.
    dups = duplicates([order_of(2, 0), order_of(0, 1), order_of(0, 3)]) + duplicates(
        [order_of(1, 5), order_of(3, 2)]
    )
    tasks = {t.planned.ordinal: t for t in unit_tasks(_plan(4, done={1}), dups)}
    assert sorted(tasks) == [0, 2, 3]  # the done unit has no task
    assert tasks[0].dup_of == {3: order_of(0, 1)}
    assert tasks[0].exports == {1}  # unit 2 waits for it; unit 0's own duplicate does not count
    assert tasks[2].dup_of == {0: order_of(0, 1)} and tasks[2].exports == set()
    assert tasks[3].dup_of == {2: order_of(1, 5)}  # owned by a committed unit


def test_random_plans_give_each_image_one_owner():
    rng = random.Random(7)
    for _ in range(200):
        units = rng.randint(1, 6)
        images = [rng.randrange(5) for _ in range(units * 4)]  # 4 occurrences per unit
        by_image: dict[int, list[int]] = {}
        for k, image in enumerate(images):
            by_image.setdefault(image, []).append(order_of(k // 4, k % 4))
        dups = [d for orders in by_image.values() for d in duplicates(orders)]
        tasks = unit_tasks(_plan(units), dups)
        owners = {order_of(t.planned.ordinal, p) for t in tasks for p in range(4) if p not in t.dup_of}
        assert owners == {min(orders) for orders in by_image.values()}
