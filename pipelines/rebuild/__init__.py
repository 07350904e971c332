"""Keeping the index current (``faceaudit rebuild``; docs/operations.md): registry fingerprints,
the delta plan, the rebuild driver and its reports. The rebuild lock is ``pipelines.core.locks``;
old versions are pruned by ``indexing.prune``."""
