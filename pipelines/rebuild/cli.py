"""``faceaudit rebuild | export | verify | prune`` (mounted into pipelines/cli.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from pipelines.commands.common import fail as _fail
from pipelines.commands.common import out
from pipelines.commands.index import PUBLIC_KEY_HELP, SIGNING_KEY_HELP
from pipelines.core.errors import ConfigError, FaceauditError
from pipelines.core.locks import EXIT_LOCKED, LockHeld


def rebuild(
    ctx: typer.Context,
    index: Annotated[
        str, typer.Option(help="index root (local folder or gs://...): versions, CURRENT, lock, reports")
    ],
    work: Annotated[str, typer.Option(help="<out> root for the ingest runs (local folder or gs://...)")],
    registry: Annotated[
        str,
        typer.Option(
            help=(
                "folders of data set YAMLs, comma-separated; a later folder's entry of the same "
                "name wins (e.g. configs/datasets/catalog,my-registry)"
            )
        ),
    ] = "configs/datasets",
    config: Annotated[
        str | None, typer.Option(help="rebuild YAML (any setting below, plus model, decode, http)")
    ] = None,
    engine: Annotated[str | None, typer.Option(help="ingest engine: local | ray | beam")] = None,
    keep_versions: Annotated[
        int | None, typer.Option(help="index versions kept (CURRENT and before); default 3")
    ] = None,
    growth_factor: Annotated[
        float | None,
        typer.Option(help="retrain once the collection is this many times its trained size; default 2"),
    ] = None,
    max_bytes_per_vector: Annotated[
        int | None, typer.Option(help="RAM budget per vector (codes + 8-byte id)")
    ] = None,
    target_recall: Annotated[
        float | None, typer.Option(help="recall@10 the tuned nprobe must reach; default 0.95")
    ] = None,
    min_recall: Annotated[
        float | None,
        typer.Option(help="a version below this recall@10 never becomes CURRENT; default: the target"),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="ingest worker processes (default: one per core)")
    ] = None,
    images_per_shard: Annotated[int | None, typer.Option(help="images per work unit and shard")] = None,
    lock_ttl_s: Annotated[
        int | None, typer.Option(help="lock expiry in seconds (renewed while running)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    signing_key: Annotated[str | None, typer.Option("--signing-key", help=SIGNING_KEY_HELP)] = None,
) -> None:
    """Bring the index up to date with the registry: ingest what is new, build, check, then move CURRENT.

    With --engine beam, any further arguments are Beam pipeline options (--runner=DataflowRunner ...)."""
    from indexing import signing

    from .config import load_rebuild_config
    from .driver import rebuild as run_rebuild

    overrides = dict(
        index=index,
        work=work,
        registry=registry,
        engine=engine,
        keep_versions=keep_versions,
        growth_factor=growth_factor,
        max_bytes_per_vector=max_bytes_per_vector,
        target_recall=target_recall,
        min_recall=min_recall,
        workers=workers,
        images_per_shard=images_per_shard,
        lock_ttl_s=lock_ttl_s,
        progress=progress,
    )
    try:
        cfg = load_rebuild_config(config, overrides)
        if ctx.args:
            if cfg.engine != "beam":
                raise ConfigError(f"unknown arguments {ctx.args} (pipeline options are for --engine beam)")
            cfg.beam = cfg.beam.model_copy(update={"options": [*cfg.beam.options, *ctx.args]})
        key = signing.signing_key(signing_key)  # a bad key file fails before any work
        with signing.signing_with(key):
            state = run_rebuild(cfg)
    except LockHeld as exc:
        _fail(exc, EXIT_LOCKED)
    except FaceauditError as exc:
        _fail(exc)
    delta = state.delta.summary() if state.delta else {}
    out.print(
        f"rebuild {state.status}: ingested {delta.get('ingest') or 'nothing'}, "
        f"removed {delta.get('removed') or 'nothing'}, decoded and embedded {state.analyzed or 0} image(s)"
    )
    if state.version is not None:
        m = state.version.manifest
        out.print(
            f"version {state.version.version} ({state.version.decision.mode}: "
            f"{state.version.decision.reason}): "
            f"{m['counts']['faces']} faces, {m['factory']}, recall@10 {m['recall']['at_10']:.3f}"
        )
    if state.gc is not None and (state.gc.deleted_versions or state.gc.deleted_runs):
        out.print(f"deleted versions {state.gc.deleted_versions}, runs {state.gc.deleted_runs}")
    out.print(f"report: {state.report_uri}")


def export(
    index: Annotated[str, typer.Option(help="index root (uses CURRENT) or a version folder")],
    to: Annotated[str, typer.Option(help="destination index root (local folder or gs://...)")],
    shards: Annotated[
        int | None, typer.Option(help="re-shard into this many shards (default: as they are)")
    ] = None,
    version: Annotated[str | None, typer.Option(help="export this version instead of CURRENT's")] = None,
    signing_key: Annotated[str | None, typer.Option("--signing-key", help=SIGNING_KEY_HELP)] = None,
    public_key: Annotated[
        str | None, typer.Option("--public-key", help="the source: " + PUBLIC_KEY_HELP)
    ] = None,
) -> None:
    """Copy a verified index version to another root (itself a valid bundle), re-sharded if asked.
    Without --signing-key, a signed source stays signed only if the export changes nothing."""
    from indexing import signing
    from indexing.export import export as run_export

    try:
        key = signing.signing_key(signing_key)
        with signing.signing_with(key):
            result = run_export(index, to, shards, version, public_key=public_key)
    except FaceauditError as exc:
        _fail(exc)
    out.print(
        f"exported {result.version} to {result.folder}: {result.shards} shard(s), {result.files} files, "
        f"{result.bytes / 1e6:.1f} MB; CURRENT moved"
    )


def verify(
    uri: Annotated[str, typer.Argument(help="index root (checks CURRENT's version) or a version folder")],
    public_key: Annotated[str | None, typer.Option("--public-key", help=PUBLIC_KEY_HELP)] = None,
) -> None:
    """Check a bundle's manifest checksum (and signature, with a public key) and every file's size
    and sha256; exit 1 naming a bad file."""
    from indexing.export import verify_bundle

    try:
        folder, manifest = verify_bundle(uri, public_key=public_key)
    except FaceauditError as exc:
        _fail(exc)
    files = sum(
        1 for s in manifest["shards"] for k in ("index", "ivfdata", "metadata", "ids", "vectors") if s.get(k)
    )
    out.print(
        f"ok: {folder} (version {manifest['version']}, {files + 1} files, "
        f"{manifest['counts']['faces']} faces)"
    )


def prune(
    index: Annotated[str, typer.Option(help="index root")],
    work: Annotated[
        str | None, typer.Option(help="<out> root of the rebuild runs (their rebuild-* runs are collected)")
    ] = None,
    keep_versions: Annotated[int, typer.Option(help="index versions kept (CURRENT and before)")] = 3,
    grace_s: Annotated[
        float, typer.Option(help="a version that never became CURRENT is kept this long")
    ] = 3600,
) -> None:
    """Keep the last N index versions; delete older ones, versions never made CURRENT, unneeded runs."""
    from indexing import bundle
    from indexing import prune as gcmod
    from pipelines.core import storage
    from pipelines.core.locks import ExpiringLock

    try:
        with ExpiringLock(index):
            current_uri = storage.join(index, bundle.CURRENT)
            current = storage.read_text(current_uri).strip() if storage.exists(current_uri) else None
            result = gcmod.collect(index, work, keep_versions, grace_s, current)
    except LockHeld as exc:
        _fail(exc, EXIT_LOCKED)
    except FaceauditError as exc:
        _fail(exc)
    out.print(f"kept {result.kept}; deleted versions {result.deleted_versions}, runs {result.deleted_runs}")


def mount(app: typer.Typer) -> None:
    # arguments rebuild does not know are Beam pipeline options, as for ingest
    app.command("rebuild", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        rebuild
    )
    for fn in (export, verify, prune):
        app.command(fn.__name__)(fn)
