"""The owner rule for engines that meet a run's units out of order (Ray, Beam).

The local engine sees every occurrence in plan order, so "first seen" is simply "first
occurrence". A distributed engine reads units in parallel, so it needs a rule that does not
depend on timing: each occurrence has an ``order`` (its unit's place in the plan, then its
position in the unit), and the same bytes met several times belong to the occurrence of least
order, the *owner*. Only the owner is analysed and only the owner's unit writes the image's
``faces`` rows; every occurrence's ``images`` row carries the owner's result. That is exactly
what the local engine writes, whatever the engine.

Nothing here imports an engine: engines call these functions from their tasks and workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .config import HttpConfig, JobConfig
from .records import ImageResult, RawImage, WorkUnit
from .run import RunState, Tally, UnitBuffer, committed_images
from .sources import read_unit
from .stages import read_error_result, result_from_image_row

POSITION_BITS = 32  # a unit holds fewer than 2**32 occurrences


def order_of(ordinal: int, position: int) -> int:
    """One int64 that sorts occurrences by (unit in plan order, position in the unit)."""
    return (ordinal << POSITION_BITS) | position


def ordinal_of(order: int) -> int:
    return order >> POSITION_BITS


def position_of(order: int) -> int:
    return order & ((1 << POSITION_BITS) - 1)


@dataclass(frozen=True, slots=True)
class PlannedUnit:
    """A work unit and its place in the run's plan (``plan_run`` lists data sets in job order,
    then each data set's units by index)."""

    unit: WorkUnit
    ordinal: int
    done: bool


def plan_order(job: JobConfig, state: RunState) -> list[PlannedUnit]:
    """Every unit of the run, done or not, in plan order."""
    rank = {spec.name: i for i, spec in enumerate(job.datasets)}
    done = {u.key for u in state.done}
    units = sorted(state.done + state.pending, key=lambda u: (rank[u.dataset], u.index))
    return [PlannedUnit(u, i, u.key in done) for i, u in enumerate(units)]


# The pseudo unit before the run's first, holding the images known from earlier runs.
KNOWN_ORDINAL = -1


def known_owners(known: dict[str, ImageResult]) -> Iterator[tuple[int, str, ImageResult]]:
    """(order, sha, result without faces) of each image whose faces earlier runs committed with
    the same model (``faceaudit rebuild``'s incremental ingest), as owners in a pseudo unit that
    sorts before the run's first: every occurrence in the run is then a duplicate of one, written
    with its result and no faces, and never decoded. The local engine's ``seen`` does the same."""
    for i, sha in enumerate(sorted(known)):
        yield order_of(KNOWN_ORDINAL, i), sha, known[sha].without_faces()


@dataclass(slots=True)
class Occurrence:
    """One occurrence read from a unit: where it came from, its hash, and its bytes while needed."""

    order: int
    raw: RawImage
    sha: str | None

    def drop_bytes(self) -> Occurrence:
        self.raw = RawImage(
            self.raw.dataset, self.raw.source_uri, error=self.raw.error, provenance=self.raw.provenance
        )
        return self


def read_occurrences(planned: PlannedUnit, http: HttpConfig) -> Iterator[Occurrence]:
    """The unit's occurrences in order, hashed, with their bytes."""
    for position, raw in enumerate(read_unit(planned.unit, http)):
        yield Occurrence(order_of(planned.ordinal, position), raw, raw.sha256)


def committed_results(run_uri: str, planned: PlannedUnit) -> list[tuple[int, str, ImageResult]]:
    """(order, sha, result without faces) of a done unit's readable occurrences, from its shard."""
    return [
        (order_of(planned.ordinal, position), row["image_sha256"], result_from_image_row(row))
        for position, row in enumerate(committed_images(run_uri, planned.unit))
        if row["image_sha256"]
    ]


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A later occurrence of bytes met before in the run."""

    order: int
    owner: int  # the order of the bytes' first occurrence


def duplicates(orders: Iterable[int]) -> list[Duplicate]:
    """Given the orders of every occurrence of one image, each non-owner and its owner."""
    first, *rest = sorted(orders)
    return [Duplicate(order, first) for order in rest]


@dataclass(slots=True)
class UnitTask:
    """What a worker needs to process one pending unit."""

    planned: PlannedUnit
    dup_of: dict[int, int] = field(default_factory=dict)  # position -> owner order
    exports: set[int] = field(default_factory=set)  # positions whose result a later unit needs

    @property
    def key(self) -> str:
        return self.planned.unit.key


def unit_tasks(units: list[PlannedUnit], dups: Iterable[Duplicate]) -> list[UnitTask]:
    """One task per pending unit, told which of its occurrences are duplicates, and which of its
    owners' results other units wait for."""
    tasks = {p.ordinal: UnitTask(p) for p in units if not p.done}
    for dup in dups:
        task = tasks.get(ordinal_of(dup.order))
        if task is not None:
            task.dup_of[position_of(dup.order)] = dup.owner
        owner_task = tasks.get(ordinal_of(dup.owner))
        if owner_task is not None and ordinal_of(dup.owner) != ordinal_of(dup.order):
            owner_task.exports.add(position_of(dup.owner))
    return sorted(tasks.values(), key=lambda t: t.planned.ordinal)


@dataclass(slots=True)
class UnitWork:
    """A pending unit on its way through the workers: occurrences in order (without bytes), the
    bytes still to analyse, and the results so far."""

    task: UnitTask
    occurrences: list[Occurrence]
    todo: dict[int, bytes] = field(default_factory=dict)  # position -> bytes of an owner
    results: dict[int, ImageResult] = field(default_factory=dict)  # position -> owner's result


def read_for_analysis(task: UnitTask, http: HttpConfig) -> UnitWork:
    """Read a unit; keep the bytes of the images it owns (the others are analysed elsewhere)."""
    work = UnitWork(task, [])
    for occ in read_occurrences(task.planned, http):
        position = position_of(occ.order)
        if occ.raw.data is not None and position not in task.dup_of:
            work.todo[position] = occ.raw.data
        work.occurrences.append(occ.drop_bytes())
    return work


def exported_results(work: UnitWork) -> dict[int, ImageResult]:
    """Order -> result (without faces) of this unit's owners that later units wait for."""
    return {
        order_of(work.task.planned.ordinal, p): work.results[p].without_faces()
        for p in sorted(work.task.exports)
        if p in work.results
    }


def foreign_owners(work: UnitWork) -> set[int]:
    """Orders of owners in other units whose results this unit needs before it can commit."""
    ordinal = work.task.planned.ordinal
    return {owner for owner in work.task.dup_of.values() if ordinal_of(owner) != ordinal}


def commit_unit(
    work: UnitWork, run: str, run_id: str, model_id: str, dim: int, foreign: dict[int, ImageResult]
) -> Tally:
    """Commit the unit's faces then images shard; ``foreign`` holds the results of its
    duplicates' owners in other units. Returns the unit's counts."""
    buffer = UnitBuffer(work.task.planned.unit, run_id, model_id, dim)
    tally = Tally()
    for occ in work.occurrences:
        result, owner = _result_of(work, occ, foreign)
        buffer.add(occ.raw, result, owner)
        tally.add(result)
    buffer.commit(run)
    return tally


def _result_of(work: UnitWork, occ: Occurrence, foreign: dict[int, ImageResult]) -> tuple[ImageResult, bool]:
    if occ.raw.error is not None or occ.sha is None:
        return read_error_result(occ.raw), False
    position = position_of(occ.order)
    owner = work.task.dup_of.get(position)
    if owner is None:
        return work.results[position], True
    if ordinal_of(owner) == work.task.planned.ordinal:
        return work.results[position_of(owner)], False
    return foreign[owner], False


def merge_tallies(tallies: Iterable[Tally]) -> Tally:
    total = Tally()
    for t in tallies:
        total.merge(t)
    return total
