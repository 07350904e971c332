"""What every command shares: its consoles and the one way it fails on faceaudit's own errors."""

from __future__ import annotations

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)


def fail(exc: Exception, code: int = 1) -> None:
    """Print the error in one line and exit with ``code``: no traceback for an expected failure."""
    err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
    raise typer.Exit(code)
