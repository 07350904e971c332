"""``faceaudit serve``: the look-up service (pipelines/service/, docs/service.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.core.errors import FaceauditError

from .common import fail


def serve(
    index: Annotated[
        str, typer.Option("--index", help="index root (uses CURRENT) or a version folder; local or gs://")
    ],
    host: Annotated[str | None, typer.Option(help="address to listen on (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on (default 8080)")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="serve.yaml: every key is described in docs/service.md")
    ] = None,
    reload_on_current: Annotated[
        bool | None,
        typer.Option(
            "--reload-on-current/--no-reload-on-current", help="open a new version when CURRENT moves"
        ),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="photo searches that run at once (default 2)")] = None,
    public_key: Annotated[
        str | None, typer.Option("--public-key", help="refuse an index not signed by this Ed25519 public key")
    ] = None,
) -> None:
    """Serve the look-up page and API: photo search, identifier look-up, erasure requests.

    The model and the index load once at start-up (/readyz turns 200 then). Nothing a person
    sends is stored or logged; see the README's "Look-up service"."""
    from pipelines.service.app import serve as run
    from pipelines.service.config import load

    overrides = dict(
        index=index,
        host=host,
        port=port,
        reload_on_current=reload_on_current,
        workers=workers,
        public_key=public_key,
    )
    try:
        settings = load(config, overrides)
    except FaceauditError as exc:
        fail(exc, 2)
    run(settings)
