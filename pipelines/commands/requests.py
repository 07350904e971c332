"""``faceaudit requests list | approve ID | reject ID``: erasure requests from the look-up service."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Annotated

import typer

from indexing.erase import index_root
from indexing.requests import RequestStore, approve
from pipelines.core.errors import FaceauditError

from .common import fail, out

requests_app = typer.Typer(
    help="Erasure requests people made on the look-up service (<index>/_requests/).", no_args_is_help=True
)
IndexOpt = Annotated[str, typer.Option("--index", help="index root (uses CURRENT) or a version folder")]


@requests_app.command("list")
def list_requests(
    index: IndexOpt,
    status: Annotated[str | None, typer.Option(help="only this status: received | erased | rejected")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False,
) -> None:
    """Every request: id, status, when, how many faces, the contact given (if any)."""
    try:
        found = [r for r in RequestStore(index_root(index)).list() if status is None or r.status == status]
    except FaceauditError as exc:
        fail(exc, 2)
    if as_json:
        json.dump([asdict(r) for r in found], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if not found:
        out.print("no erasure requests")
    for r in found:
        out.print(
            f"{r.request_id}  {r.status:<8}  {r.created_at}  {len(r.face_ids)} face(s)  "
            f"version {r.index_version}  contact: {r.contact or '-'}",
            markup=False,
            soft_wrap=True,
        )


@requests_app.command("approve")
def approve_request(
    request_id: Annotated[str, typer.Argument(help="the request id")],
    index: IndexOpt,
    erasure_log: Annotated[
        str | None, typer.Option(help="the erasure log (default: <index>/_erasure)")
    ] = None,
) -> None:
    """Erase the request's faces (as ``faceaudit erase --face-id``), then mark it erased."""
    try:
        request, report = approve(index, request_id, erasure_log)
    except FaceauditError as exc:
        fail(exc, 2)
    out.print(
        f"request {request.request_id}: erased ({request.faces_erased} face(s) found in the index; "
        f"{report.run_faces_removed} run row(s) and "
        f"{sum(report.bundle_faces_removed.values())} bundle face(s) removed)"
    )


@requests_app.command("reject")
def reject_request(
    request_id: Annotated[str, typer.Argument(help="the request id")],
    index: IndexOpt,
) -> None:
    """Mark the request rejected; nothing is erased."""
    try:
        request = RequestStore(index_root(index)).decide(request_id, "rejected")
    except FaceauditError as exc:
        fail(exc, 2)
    out.print(f"request {request.request_id}: rejected")
