"""The engine-agnostic core: pure stages and their data types.

Nothing under this package imports Ray or Apache Beam; engines import the core, never the
reverse (tests/unit/test_layering.py checks it).
"""
