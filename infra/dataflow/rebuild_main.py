"""Dataflow flex template entry point for scheduled rebuilds: ``faceaudit rebuild --engine beam``
with the template's parameters (``registry``, ``work``, ``index``, ``keep_versions``); every other
argument the launcher passes (project, region, temp_location, sdk_container_image, ...) is a Beam
pipeline option for the ingest of new and changed data sets. The plan, the index build, its checks
and the move of CURRENT run here, in the launcher."""

from __future__ import annotations

import sys

from pipelines.cli import app, template_args

# template parameter -> faceaudit rebuild flag
FLAGS = {"registry": "--registry", "work": "--work", "index": "--index", "keep_versions": "--keep-versions"}


def rebuild_args(argv: list[str]) -> list[str]:
    return template_args("rebuild", FLAGS, argv)


if __name__ == "__main__":
    app(rebuild_args(sys.argv[1:]))
