"""The ``faceaudit`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .core.config import DatasetSpec, JobConfig, load_job, validate_job
from .core.errors import FaceauditError

app = typer.Typer(
    help="faceaudit: find out whether a face is in openly shared face data sets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


@app.callback()
def _group() -> None:
    """faceaudit: find out whether a face is in openly shared face data sets."""


def _dataset_flag(value: str) -> DatasetSpec:
    name, sep, uri = value.partition("=")
    if not sep or not name or not uri:
        raise typer.BadParameter(f"expected NAME=URI, got {value!r}")
    return DatasetSpec(name=name, source=uri)


def _build_job(config: Path | None, datasets: list[str], overrides: dict) -> JobConfig:
    if config is None and not datasets:
        raise typer.BadParameter("give --config FILE or at least one --dataset NAME=URI")
    raw = load_job(config).model_dump() if config else {"datasets": []}
    if datasets:
        raw["datasets"] = [_dataset_flag(d).model_dump() for d in datasets]
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("detector", "detect_max_side"):
            raw.setdefault("model", {})[key] = value
        else:
            raw[key] = value
    return validate_job(raw)


# Arguments the command does not know are Beam pipeline options (--runner=DataflowRunner ...).
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ingest(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="job YAML (configs/jobs/<job>.yaml)")] = None,
    dataset: Annotated[
        list[str] | None,
        typer.Option(help="NAME=URI of a data set (folder, tar shards or URI list); repeatable"),
    ] = None,
    out: Annotated[str | None, typer.Option(help="<out> root: a local folder or gs://bucket/prefix")] = None,
    engine: Annotated[str | None, typer.Option(help="local | ray | beam")] = None,
    run_id: Annotated[
        str | None, typer.Option(help="run id; give an existing one to resume that run")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes (default: one per core)")] = None,
    images_per_shard: Annotated[int | None, typer.Option(help="images per work unit and shard")] = None,
    detector: Annotated[str | None, typer.Option(help="dlib detector: hog | cnn")] = None,
    detect_max_side: Annotated[
        int | None, typer.Option(help="detect on a copy downscaled to this longest side (0: full size)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    erasure_log: Annotated[
        str | None, typer.Option(help="erasure log whose faces are never written (e.g. INDEX/_erasure)")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="--engine ray: the cluster to join (default: RAY_ADDRESS, else local)")
    ] = None,
) -> None:
    """Ingest data sets: decode, detect, embed, and write Parquet shards of faces and images.

    With --engine beam, any further arguments are Beam pipeline options, e.g.
    --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp."""
    overrides = dict(
        out=out,
        engine=engine,
        run_id=run_id,
        workers=workers,
        images_per_shard=images_per_shard,
        detector=detector,
        detect_max_side=detect_max_side,
        progress=progress,
        erasure_log=erasure_log,
    )
    with _fatal_errors():
        job = _build_job(config, dataset or [], overrides)
        if ray_address:
            job = job.model_copy(update={"ray": job.ray.model_copy(update={"address": ray_address})})
        summary = _run(job, ctx.args)
        if summary.seconds:  # a run that did something; a complete one keeps the report it had
            from .rebuild.report import run_report, write_report  # report.json/.html beside the manifest

            write_report(summary.uri, run_report(summary.uri, getattr(summary, "analyzed", None)))
    print_run_summary(summary.manifest, summary.uri, summary.seconds, summary.resumed_units)
    typer.echo(summary.run_id)


def _run(job: JobConfig, beam_args: list[str]):
    from .engines import run_job  # the engine's adapter loads only when chosen

    return run_job(job, beam_args)


class _fatal_errors:
    """Turn faceaudit's own errors into a one-line message and a non-zero exit: EXIT_LOCKED (3)
    when the run is another process's or another plan's (a scheduler may try again later, or
    must choose another run id), 2 otherwise."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, FaceauditError):
            from .core.locks import EXIT_LOCKED, LockHeld
            from .core.run import RunConflict

            console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_LOCKED if isinstance(exc, (LockHeld, RunConflict)) else 2) from exc
        return False


def print_run_summary(manifest: dict, uri: str, seconds: float, resumed_units: int = 0) -> None:
    counts = manifest["counts"]
    table = Table(title=f"run {manifest['run_id']} ({manifest['model_id']})")
    for column in ("data set", "images", "ok", "no face", "errors", "faces"):
        table.add_column(column, justify="left" if column == "data set" else "right")
    for name, c in counts.get("per_dataset", {}).items():
        table.add_row(name, *(str(c.get(k, 0)) for k in ("images", "ok", "no_face", "error", "faces")))
    table.add_row(
        "[bold]all", *(f"[bold]{counts.get(k, 0)}" for k in ("images", "ok", "no_face", "error", "faces"))
    )
    console.print(table)
    if seconds:
        console.print(
            f"{counts['images'] / seconds:.1f} images/s, {counts['faces'] / seconds:.1f} faces/s"
            f" over {seconds:.1f} s"
            + (f" ({resumed_units} units were already committed)" if resumed_units else "")
        )
    else:
        console.print("this run was already complete; nothing was done")
    console.print(f"shards: {uri}/faces/ and {uri}/images/ ; manifest: {uri}/_manifest.json")


def template_args(command: str, flags: dict[str, str], argv: list[str]) -> list[str]:
    """A Dataflow flex template's arguments as ``faceaudit COMMAND --engine beam`` arguments: the
    template parameters named in ``flags`` become their flags; every other argument the launcher
    passes (project, region, temp_location, ...) stays a Beam pipeline option."""
    args = [command, "--engine", "beam", "--no-progress"]
    for arg in argv:
        name, sep, value = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and sep and name in flags:
            args += [flags[name], value]
        else:
            args.append(arg)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DataflowRunner")
    return args


def main() -> None:  # pragma: no cover - console entry point
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


def _mount_commands() -> None:
    """Every command on the one entry point; each module is imported here, after ``app`` exists."""
    from .commands import datasets, erase, gc, index, lookup, requests, serve
    from .rebuild.cli import mount

    app.add_typer(index.index_app, name="index")
    app.add_typer(datasets.datasets_app, name="datasets")
    app.add_typer(requests.requests_app, name="requests")
    for name, command in (
        ("search", index.search),
        ("keygen", index.keygen),
        ("gc", gc.gc),
        ("erase", erase.erase_command),
        ("serve", serve.serve),
        ("lookup", lookup.lookup),
    ):
        app.command(name)(command)
    mount(app)  # rebuild, export, verify, prune


_mount_commands()
