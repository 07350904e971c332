"""One-way layers (docs/architecture.md), checked over every module, function-level imports included:

    pipelines/core  <-  pipelines/engines  <-  indexing  <-  applications (the rest of pipelines/)

A module imports only its own layer or lower ones, no two modules import each other through a
cycle, and the core is engine-agnostic: it imports neither Ray, Beam, an engine nor indexing.
"""

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

CORE = REPO / "pipelines" / "core"
FORBIDDEN = ("ray", "apache_beam", "pipelines.engines", "pipelines.cli", "indexing")
LAYERS = ("pipelines.core", "pipelines.engines", "indexing", "applications")


def _imports(path: Path, root: Path = REPO):
    """Every module name an import statement in ``path`` names (``from a import b`` gives ``a`` and
    ``a.b``; ``edges`` keeps those that are modules)."""
    package = list(path.relative_to(root).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = REPO) -> dict[str, Path]:
    tops = ("pipelines", "indexing")
    return {module_name(p, root): p for top in tops for p in sorted((root / top).rglob("*.py"))}


def layer(module: str) -> int:
    for rank, prefix in enumerate(LAYERS[:3]):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return 3  # pipelines.cli, pipelines.commands, pipelines.rebuild, pipelines.demo, ...


def edges(modules: dict[str, Path], root: Path = REPO) -> dict[str, set[str]]:
    """module -> the project modules it imports. ``from pkg import sub`` counts as an import of
    ``pkg.sub`` only (Python runs ``pkg/__init__`` first whatever is imported from it)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        named = list(_imports(path, root))
        targets = {resolve(n) for n in named}
        # ``from pkg import sub`` names pkg too; pkg counts only when something else in pkg itself
        # (a function, a class) is imported from it, or it is imported plainly
        subs = {n for n in named if n in modules}
        parents = {n.rpartition(".")[0] for n in subs}
        used_directly = {resolve(n) for n in named if n not in subs}
        targets -= parents - used_directly
        graph[name] = {t for t in targets if t and t != name}
    return graph


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


def test_every_package_is_layered():
    modules = project_modules()
    assert {layer(m) for m in modules} == {0, 1, 2, 3}
    assert layer("pipelines.cli") == layer("pipelines.rebuild.driver") == layer("pipelines.commands.gc") == 3
    assert layer("indexing.erase.steps") == 2 and layer("pipelines.engines") == 1


def test_imports_point_down_the_layers():
    modules = project_modules()
    upward = [
        f"{m} ({LAYERS[layer(m)]}) imports {t} ({LAYERS[layer(t)]})"
        for m, targets in sorted(edges(modules).items())
        for t in sorted(targets)
        if layer(t) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_cycles():
    assert strongly_connected(edges(project_modules())) == []


@pytest.mark.parametrize(
    "graph, cycles",
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set(), "c": {"b"}}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, cycles):
    assert strongly_connected(graph) == cycles


def test_an_upward_function_level_import_is_caught(tmp_path):
    for rel, text in {
        "pipelines/__init__.py": "",
        "pipelines/core/__init__.py": "",
        "pipelines/core/stages.py": "def f():\n    from indexing import build\n",
        "indexing/__init__.py": "",
        "indexing/build.py": "from pipelines.core import stages\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = edges(project_modules(tmp_path), tmp_path)
    assert graph["pipelines.core.stages"] == {"indexing.build"}
    assert strongly_connected(graph) == [["indexing.build", "pipelines.core.stages"]]
