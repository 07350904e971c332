"""The core is engine-agnostic: nothing under pipelines/core imports Ray, Beam, an engine or indexing."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "pipelines" / "core"
FORBIDDEN = ("ray", "apache_beam", "pipelines.engines", "pipelines.cli", "indexing")


def _imports(path: Path):
    package = list(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            yield ".".join(base + ([node.module] if node.module else []))


def test_relative_imports_resolve():
    names = set(_imports(CORE / "models" / "dlib_backend.py"))
    assert "pipelines.core.decode" in names and "pipelines.core.models.base" in names


def test_core_imports_no_engine():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 5
    for path in files:
        for name in _imports(path):
            assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), (
                f"{path.name} imports {name}"
            )
