"""Dataflow flex template entry point: ``faceaudit ingest --engine beam`` with the template's
parameters (``config``, ``dataset``, ``out``, ``run_id``); every other argument the launcher
passes (project, region, temp_location, sdk_container_image, ...) is a Beam pipeline option."""

from __future__ import annotations

import sys

from pipelines.cli import app

# template parameter -> faceaudit ingest flag
FLAGS = {"config": "--config", "dataset": "--dataset", "out": "--out", "run_id": "--run-id"}


def ingest_args(argv: list[str]) -> list[str]:
    args = ["ingest", "--engine", "beam", "--no-progress"]
    for arg in argv:
        name, sep, value = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and sep and name in FLAGS:
            args += [FLAGS[name], value]
        else:
            args.append(arg)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DataflowRunner")
    return args


if __name__ == "__main__":
    app(ingest_args(sys.argv[1:]))
