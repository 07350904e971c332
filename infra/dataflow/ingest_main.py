"""Dataflow flex template entry point: ``faceaudit ingest --engine beam`` with the template's
parameters (``config``, ``dataset``, ``out``, ``run_id``); every other argument the launcher
passes (project, region, temp_location, sdk_container_image, ...) is a Beam pipeline option."""

from __future__ import annotations

import sys

from pipelines.cli import app, template_args

# template parameter -> faceaudit ingest flag
FLAGS = {"config": "--config", "dataset": "--dataset", "out": "--out", "run_id": "--run-id"}


def ingest_args(argv: list[str]) -> list[str]:
    return template_args("ingest", FLAGS, argv)


if __name__ == "__main__":
    app(ingest_args(sys.argv[1:]))
