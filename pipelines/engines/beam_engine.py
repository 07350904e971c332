"""The Beam engine: the core's stages as an Apache Beam pipeline (DirectRunner, Dataflow, Flink, Spark).

    pending units -> Reshuffle -> Read (hash; unreadable records to a dead-letter output)
      -> key by sha256, group: the owner is the least (unit in plan, position) (core.dedup)
      -> Decode (in Beam's own subprocess: with_exception_handling(use_subprocess=True, timeout=...),
         so a decoder that crashes or hangs sends that image to a dead letter, an error row)
      -> RunInference(FaceModelHandler: load_model once per worker, detect and embed per batch)
      -> fan the result out to every occurrence -> group by unit
      -> Commit (faces then images shard, each a temporary file renamed into place)
      -> Finish (the manifest, once every unit is committed)

A bad record is a row (analyze_batch never raises for one), so it never fails a bundle; a model
that will not load or every record failing fails the job, and no manifest is written. Bundles
may be replayed: commits are whole-file renames of identical content and the manifest is
create-only, so replays change nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..core import isolate, orphans, storage
from ..core.config import DecodeConfig, HttpConfig, JobConfig, ModelConfig
from ..core.dedup import (
    Occurrence,
    PlannedUnit,
    committed_results,
    known_owners,
    merge_tallies,
    ordinal_of,
    plan_order,
    position_of,
    read_occurrences,
)
from ..core.errors import FatalError
from ..core.faults import checkpoint
from ..core.models import FaceModel, load_model
from ..core.records import DecodedImage, ImageResult, RawImage, WorkUnit
from ..core.run import (
    RunState,
    RunSummary,
    Tally,
    UnitBuffer,
    finish_run,
    hold_run,
    is_committed,
    read_manifest,
    run_uri,
)
from ..core.stages import analyze_decoded, decode_one, read_error_result, result_fields, result_from_image_row
from ..core.storage import AlreadyExists
from .common import ModelInfo, default_batch_size, manifest_header, require

log = logging.getLogger(__name__)

# Without the beam extra, importing this module fails with the pip install that fixes it.
beam = require("apache_beam", "beam")
inference = require("apache_beam.ml.inference.base", "beam")

PLAN = orphans.BEAM_PLAN  # the run's units, one JSON line each, read by the pipeline
KNOWN_FILE = orphans.BEAM_KNOWN  # images known from earlier runs (rebuild), one JSON line each
UNREADABLE = "unreadable"  # dead letters of the read step: occurrences whose bytes could not be read
Decoded = tuple[ImageResult, DecodedImage | None]  # decode_one's result: the row so far, the pixels
UNITS = "units"  # one ReadMarker per unit: a unit with no readable image still commits
KNOWN = "known"  # occurrences whose owner was committed by an earlier attempt of the run
ANALYZED = "analyzed"  # the counter of images sent to decode, detect and embed


@dataclass(slots=True)
class Committed:
    """An occurrence committed by an earlier attempt: its order and result (without faces)."""

    order: int
    result: ImageResult


@dataclass(slots=True)
class UnitRow:
    """One occurrence's row on its way to its unit's commit."""

    position: int
    raw: RawImage  # without bytes
    result: ImageResult
    owner: bool


def run_job(
    job: JobConfig,
    pipeline_args: Sequence[str] = (),
    known: dict[str, ImageResult] | None = None,
    known_from: list[str] | None = None,
) -> RunSummary:
    """Run (or resume) an ingest job as a Beam pipeline; returns the committed run's manifest.

    ``pipeline_args`` are Beam pipeline options (``--runner=DataflowRunner --project=...``),
    appended to ``job.beam.options``; without a runner, the DirectRunner runs it here.
    ``known`` and ``known_from`` as for the local engine: images whose faces earlier runs committed
    get ``images`` rows here without being decoded or embedded again.
    """
    started = dt.datetime.now(dt.timezone.utc)
    with hold_run(job) as state:  # the driver is the run's one writer until the block ends
        run_id, uri = state.run_id, state.uri
        if state.committed:
            return RunSummary(run_id, uri, read_manifest(uri))
        plan = write_plan(uri, plan_order(job, state))
        run = BeamRun(job, run_id, plan, write_known(uri, known), known_from, started)
        result = run_pipeline([*job.beam.options, *pipeline_args], run.attach)
        if not is_committed(uri):  # a runner that returns before the job ends (a launched template)
            # the lock goes with this driver; the launched job's Beam plan marks the run as in flight
            log.warning("run %s was submitted; its manifest is written when the job ends", run_id)
            return RunSummary(run_id, uri, {"run_id": run_id, "counts": {}, "engine": "beam"})
        _remove_inputs(uri)
    elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    return RunSummary(run_id, uri, read_manifest(uri), len(state.done), elapsed, _analyzed(result))


def write_plan(run: str, units: list[PlannedUnit]) -> str:
    """The units go to the workers through a file, not inside the pipeline graph: a plan of
    millions of images would outgrow a runner's graph size limit (Dataflow's is 10 MB)."""
    rows = ({"ordinal": p.ordinal, "done": p.done, **asdict(p.unit)} for p in units)
    return _write_json_lines(storage.join(run, PLAN), rows)


def write_known(run: str, known: dict[str, ImageResult] | None) -> str | None:
    """Known images reach the workers through a file too (millions of them, in a big rebuild)."""
    if known is None:
        return None
    rows = ({"order": order, **_json_fields(r)} for order, _, r in known_owners(known))
    return _write_json_lines(storage.join(run, KNOWN_FILE), rows)


def _json_fields(result: ImageResult) -> dict:
    fields = result_fields(result)
    fields["pdq"] = fields["pdq"].hex() if fields["pdq"] is not None else None  # JSON has no bytes
    return fields


def _write_json_lines(uri: str, rows: Iterable[dict]) -> str:
    storage.write_atomic(uri, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return uri


def _known_owner(line: str) -> tuple[str, Committed]:
    fields = json.loads(line)
    order = fields.pop("order")
    fields["pdq"] = bytes.fromhex(fields["pdq"]) if fields.get("pdq") is not None else None
    return fields["image_sha256"], Committed(order, result_from_image_row(fields))


def _analyzed(result) -> int:
    """Images decoded and embedded, from the pipeline's counter (attempted counts: committed ones
    are not kept by every runner)."""
    from apache_beam.metrics.metric import MetricsFilter

    found = result.metrics().query(MetricsFilter().with_name(ANALYZED))["counters"]
    return sum(c.attempted or 0 for c in found)


def _remove_inputs(run: str) -> None:
    """The plan and the known images, once every step that reads them has finished."""
    for name in (PLAN, KNOWN_FILE):
        storage.remove(storage.join(run, name))


def _planned(line: str) -> PlannedUnit:
    fields = json.loads(line)
    ordinal, done = fields.pop("ordinal"), fields.pop("done")
    for name in ("items", "roots", "span", "columns"):  # JSON gave lists
        fields[name] = tuple(fields[name])
    return PlannedUnit(WorkUnit(**fields), ordinal, done)


def run_pipeline(args: list[str], attach: Callable[[beam.Pipeline], object]):
    """Run the transforms ``attach`` adds to a pipeline of options ``args`` and return the runner's
    result; a FatalError raised in a worker is raised here as itself, whatever the runner wrapped
    it in."""
    from apache_beam.options.pipeline_options import PipelineOptions

    try:
        p = beam.Pipeline(options=PipelineOptions(args))
        attach(p)
        result = p.run()
        result.wait_until_finish()
        return result
    except FatalError:
        raise
    except Exception as exc:  # runners wrap worker errors; surface ours by its message
        fatal = _fatal_in(exc)
        if fatal is None:
            raise
        raise FatalError(fatal) from None


def _fatal_in(exc: BaseException) -> str | None:
    """The message of a FatalError raised on a worker, found in the runner's wrapped error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FatalError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    for name in ("ConfigError: ", "FatalError: "):
        if name in text:
            return text.split(name, 1)[1].splitlines()[0]
    return None


@dataclass(frozen=True)
class BeamRun:
    """One attempt of a run as a pipeline: its job, the plan and known-images files it reads."""

    job: JobConfig
    run_id: str
    plan: str
    known: str | None
    known_from: list[str] | None
    started: dt.datetime

    def attach(self, p) -> None:
        job, run = self.job, run_uri(self.job.out, self.run_id)
        info = beam.pvalue.AsSingleton(
            p | "Model" >> beam.Create([job.model]) | "Describe" >> beam.Map(_describe)
        )
        units = p | "Plan" >> beam.io.ReadFromText(self.plan) | "Parse" >> beam.Map(_planned)
        reads = (
            units
            | "Pending" >> beam.Filter(lambda u: not u.done)
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadUnit(job.http)).with_outputs(UNREADABLE, UNITS, main="images")
        )
        done = units | "Done" >> beam.Filter(lambda u: u.done)
        images = [reads.images, done | "Committed" >> beam.FlatMap(_committed, run)]
        if self.known:
            known = p | "Known" >> beam.io.ReadFromText(self.known)
            images.append(known | "Owners known" >> beam.Map(_known_owner))
        owners = (
            tuple(images)
            | "All images" >> beam.Flatten()
            | "By image" >> beam.GroupByKey()
            | "Owners" >> beam.ParDo(PickOwner()).with_outputs(KNOWN, main="todo")
        )
        handler = FaceModelHandler(job.model, default_batch_size(job.model, job.beam.max_batch_size))
        analysed = (
            tuple(_analyse(owners.todo, job.decode, handler))
            | "Results" >> beam.Flatten()
            | "Fan out" >> beam.FlatMap(_fan_out)
        )
        tallies = (
            (analysed, owners[KNOWN], reads[UNREADABLE], reads[UNITS])
            | "All rows" >> beam.Flatten()
            | "By unit" >> beam.GroupByKey()
            | "Commit" >> beam.ParDo(CommitUnit(run, self.run_id), info)
        )
        _ = (
            tallies
            | "Count" >> beam.CombineGlobally(merge_tallies)
            | "Finish" >> beam.Map(_finish, info, run, self)
        )


class ReadUnit(beam.DoFn):
    """Read and hash one unit: (sha, occurrence with bytes), and dead letters for unreadable ones."""

    def __init__(self, http: HttpConfig):
        self.http = http

    def process(self, planned: PlannedUnit) -> Iterator[Any]:
        count = 0
        for occ in read_occurrences(planned, self.http):
            count += 1
            if occ.sha is None:
                row = UnitRow(position_of(occ.order), occ.raw, read_error_result(occ.raw), owner=False)
                yield beam.pvalue.TaggedOutput(UNREADABLE, (planned.ordinal, row))
            else:
                yield occ.sha, occ
        yield beam.pvalue.TaggedOutput(UNITS, (planned.ordinal, ReadMarker(planned, count)))


@dataclass(frozen=True, slots=True)
class ReadMarker:
    """A unit was read: it has ``occurrences`` rows to commit, at positions 0 to occurrences - 1."""

    planned: PlannedUnit
    occurrences: int


def _committed(planned: PlannedUnit, run: str) -> Iterator[tuple[str, Committed]]:
    for order, sha, result in committed_results(run, planned):
        yield sha, Committed(order, result)


class PickOwner(beam.DoFn):
    """All occurrences of one image -> its owner's bytes to analyse, keyed by the occurrences
    that will share the result; or, when an earlier attempt committed the owner, the rows."""

    analyzed = beam.metrics.Metrics.counter("faceaudit", ANALYZED)

    def process(self, element: tuple[str, Iterable[Occurrence | Committed]]) -> Iterator[Any]:
        _, items = element
        ordered = sorted(items, key=lambda item: item.order)
        owner, pending = ordered[0], [i for i in ordered if isinstance(i, Occurrence)]
        if isinstance(owner, Committed):
            for occ in pending:
                row = UnitRow(position_of(occ.order), occ.raw, owner.result, owner=False)
                yield beam.pvalue.TaggedOutput(KNOWN, (ordinal_of(occ.order), row))
            return
        data = owner.raw.data
        self.analyzed.inc()
        yield [occ.drop_bytes() for occ in pending], data


def _fan_out(element: tuple[list[Occurrence], ImageResult]) -> Iterator[tuple[int, UnitRow]]:
    """The owner (first) gets the faces; every other occurrence the result without them."""
    occurrences, result = element
    slim = result.without_faces()
    for i, occ in enumerate(occurrences):
        row = UnitRow(position_of(occ.order), occ.raw, result if i == 0 else slim, owner=i == 0)
        yield ordinal_of(occ.order), row


def _analyse(todo, decode: DecodeConfig, handler) -> list:
    """(occurrences, result) PCollections: the decoded owners analysed, and an error result for each
    owner that killed its decoder twice or hung.

    An image whose decode subprocess died is decoded once more in a fresh one before it becomes an
    error row: Beam starts the subprocess outside its crash handling, so a subprocess that dies
    while starting fails the element it was started for and the next one (seen as pairs of
    healthy photos marked 'crashed' in 320, on the DirectRunner). A real crasher dies twice.
    Each decode feeds its own RunInference, and only the small results are flattened: flattening
    the decoded pixels ahead of one RunInference lost a sixth of them on the DirectRunner's
    multi-processing mode (265 of 320 reached it; a Beam bug, seen with 566 MB data buffers).
    """
    decoded, crashed = todo | "Decode" >> _decode_step(decode)
    failures = crashed
    branches = [decoded | "Analyse" >> _run_inference(handler)]
    if decode.isolate:
        died = crashed | "Died" >> beam.Filter(lambda dead: not _timed_out(dead))
        timed_out = crashed | "Timed out" >> beam.Filter(_timed_out)  # a hang is not tried again
        inputs = died | "Dead input" >> beam.Map(lambda dead: dead[0])
        again, crashed_twice = inputs | "Decode again" >> _decode_step(decode)
        branches.append(again | "Analyse again" >> _run_inference(handler))
        failures = (timed_out, crashed_twice) | "Dead letters" >> beam.Flatten()
    return [*branches, failures | "Decode failures" >> beam.Map(_decode_failure, decode.timeout_s)]


def _run_inference(handler):
    return inference.RunInference(inference.KeyedModelHandler(handler))


def _timed_out(dead: tuple) -> bool:
    return issubclass(dead[1][0], TimeoutError)


def _decode_step(decode: DecodeConfig):
    """Decode each owner's bytes; with ``decode.isolate``, in Beam's subprocess under the limits."""
    step = beam.ParDo(DecodeImage(decode))
    if not decode.isolate:
        return step.with_exception_handling()
    return step.with_exception_handling(use_subprocess=True, timeout=decode.timeout_s or None)


class DecodeImage(beam.DoFn):
    """(occurrences, bytes) -> (occurrences, (result so far, pixels or None)). A bad image is an
    error result; what kills or hangs the decoder is the dead letter of with_exception_handling."""

    def __init__(self, decode: DecodeConfig):
        self.decode = decode

    def setup(self) -> None:
        if self.decode.isolate:  # this runs in Beam's decode subprocess, not in the Beam worker
            isolate.apply_memory_limit(self.decode.memory_limit_mb, on_top=True)  # it is forked
            isolate.mark_isolated()

    def process(self, element: tuple[list[Occurrence], bytes]) -> Iterator[Any]:
        occurrences, data = element
        yield occurrences, decode_one(data, self.decode)


def _decode_failure(dead: tuple, timeout_s: float) -> tuple[list[Occurrence], ImageResult]:
    """A dead letter of the decode step -> its occurrences and an error result (no bytes kept)."""
    (occurrences, data), (exc_type, _, _) = dead
    if issubclass(exc_type, TimeoutError):
        reason = f"decode timed out after {timeout_s:g} s"
    elif exc_type.__name__ == "BrokenProcessPool":
        reason = "decoder crashed or was killed"
    else:
        reason = f"decoder failed ({exc_type.__name__})"
    return occurrences, isolate.died_result(data, isolate.WorkerDied("decode", reason))


# The model of each config, loaded once per worker process: Beam's RunInference keeps one model
# per transform, and the two that analyse (decoded, decoded again after a crash) and Describe would
# load three. It is shared across a process's threads, as RunInference shares its own model.
_models: dict[str, FaceModel] = {}
_models_lock = threading.Lock()


def _loaded(config: ModelConfig) -> FaceModel:
    key = config.model_dump_json()
    with _models_lock:
        if key not in _models:
            _models.clear()  # one model held per process, not one per config a process ever ran
            _models[key] = load_model(config)
        return _models[key]


def _describe(config: ModelConfig) -> ModelInfo:
    return _loaded(config).info()


class FaceModelHandler(inference.ModelHandler):
    """RunInference's view of the model interface: load_model once per worker, then detect and
    embed the decoded images of each batch (a bad image becomes an error result)."""

    def __init__(self, model: ModelConfig, max_batch_size: int):
        super().__init__(min_batch_size=1, max_batch_size=max_batch_size)
        self.model_config = model

    def load_model(self) -> FaceModel:
        return _loaded(self.model_config)

    def run_inference(
        self, batch: Sequence[Decoded], model: FaceModel, inference_args: dict | None = None
    ) -> Iterable[ImageResult]:
        checkpoint("analyze.batch")
        return analyze_decoded(batch, model)

    def get_num_bytes(self, batch: Sequence[Decoded]) -> int:
        return sum(image.pixels.nbytes for _, image in batch if image is not None)

    def get_metrics_namespace(self) -> str:
        return "faceaudit"


class CommitUnit(beam.DoFn):
    """A unit's rows in position order -> its faces then images shard; yields the unit's counts."""

    def __init__(self, run: str, run_id: str):
        self.run, self.run_id = run, run_id

    def process(self, element: tuple[int, Iterable[Any]], info: ModelInfo) -> Iterator[Tally]:
        items = list(element[1])
        marker = next(i for i in items if isinstance(i, ReadMarker))
        planned = marker.planned
        rows = sorted((i for i in items if isinstance(i, UnitRow)), key=lambda r: r.position)
        if [r.position for r in rows] != list(range(marker.occurrences)):
            # Never commit a unit short of rows: its images shard marks it done for every resume.
            raise FatalError(
                f"unit {planned.unit.key}: {len(rows)} rows for {marker.occurrences} images reached "
                "the commit; not committed (the runner lost or repeated elements)"
            )
        buffer = UnitBuffer(planned.unit, self.run_id, info.model_id, info.dim)
        tally = Tally()
        for row in rows:
            buffer.add(row.raw, row.result, row.owner)
            tally.add(row.result)
        buffer.commit(self.run)
        yield tally


def _finish(tally: Tally, info: ModelInfo, run: str, attempt: BeamRun) -> None:
    """The run's commit point, after every unit: fail on a systemic failure, else the manifest."""
    job = attempt.job
    # Beam keeps no running count across workers, so the budget is checked on the final one.
    tally.check_end(job.max_error_fraction, job.min_images_for_budget)
    if is_committed(run):  # a replayed bundle: the manifest is already there
        return
    known_runs = None if attempt.known is None else attempt.known_from or []
    header = manifest_header(job, attempt.run_id, "beam", info, attempt.started, known_runs)
    try:
        finish_run(RunState(run, [], []), header)
    except AlreadyExists:
        log.info("the manifest of %s was written by another attempt", run)
    _remove_inputs(run)
