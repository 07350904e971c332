"""What runs an index build's per-shard adds: here, as Ray tasks or as Beam workers.

The build core (``build``, ``shard`` and the rest) never imports an engine; this module picks the
per-shard adapter by the engine's name, and the adapters load only when chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipelines.engines import choose

from .shard import ShardRunner, run_local


def shard_runner(
    engine: str = "local", ray_address: str | None = None, pipeline_args: Sequence[str] = ()
) -> ShardRunner:
    """What runs the per-shard adds on ``engine``; its modules load only when it is chosen."""
    choose(engine, pipeline_args)  # the one check of an engine's name and options
    if engine == "ray":
        from .build_ray import make_runner

        return make_runner(ray_address)
    if engine == "beam":
        from .build_beam import make_runner as make_beam_runner

        return make_beam_runner(pipeline_args)
    return run_local
