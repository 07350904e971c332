"""Keeping the index current: registry fingerprints, the delta plan, the rebuild lock, the rebuild
driver, garbage collection of old versions and run reports (``faceaudit rebuild``; docs/operations.md)."""
