"""Engines: thin adapters that run the core's stages (local, Ray Data, Apache Beam).

``choose`` is the one place an engine is picked by name; Ray and Beam are optional extras, so an
adapter module is imported only when its engine is chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

from ..core.config import JobConfig
from ..core.errors import ConfigError

ENGINES = ("local", "ray", "beam")


def choose(name: str, pipeline_args: Sequence[str] = ()) -> ModuleType:
    """The adapter module of engine ``name``; Beam pipeline options are refused on other engines."""
    if name not in ENGINES:
        raise ConfigError(f"--engine {name}: expected local, ray or beam")
    if pipeline_args and name != "beam":
        raise ConfigError(f"unknown arguments {list(pipeline_args)} (pipeline options are for --engine beam)")
    return importlib.import_module(f"{__name__}.{name}_engine")


def run_job(job: JobConfig, pipeline_args: Sequence[str] = (), known=None, known_from=None):
    """Run the ingest ``job`` on its engine (``job.engine``); see ``local_engine.run_job`` for
    ``known`` and ``known_from``."""
    adapter = choose(job.engine, pipeline_args)
    if job.engine == "beam":  # pipeline options only Beam takes
        return adapter.run_job(job, pipeline_args, known, known_from)
    return adapter.run_job(job, known, known_from)
